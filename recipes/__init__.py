"""The shipped recipes (``squeeze compress --recipe NAME``): one YAML file each, with the figure it
reached and the bench case that measured it (``bench/cases/recipes.py``). See squeeze.recipe."""
