"""Every command's report carries the numbers it promises: what each pass chose, sizes, quality
against the source on held-out rows, time and memory, printed and in --json alike."""

import json
from pathlib import Path

import pytest
from squeeze.cli.main import main

from tests.conftest import STORIES, STORIES_CALIB, STORIES_EVAL, needs_shared

TINY = ["--nsamples", "8", "--seqlen", "32"]


def run(args, capsys) -> str:
    main([str(a) for a in args])
    return capsys.readouterr().out


def compress(src, out, calib, capsys, *flags, json_path=None):
    args = ["compress", src, "--out", out, "--calib", calib, *TINY, *flags, "--overwrite"]
    if json_path:
        args += ["--json", json_path]
    text = run(args, capsys)
    return text, (json.loads(Path(json_path).read_text()) if json_path else None)


def test_compress_quality_beside_source(tiny_dir, tiny_calib, tmp_path, capsys):
    from squeeze.evaluation import evaluate

    src = tiny_dir("llama")
    text, rep = compress(src, tmp_path / "o", tiny_calib, capsys, "--method", "wanda", "--pattern", "2:4",
                         "--eval-data", tiny_calib, "--eval-rows", "6", json_path=tmp_path / "r.json")
    q = rep["quality"]
    assert q["measured"] and q["rows"] == 6
    alone = evaluate(src, str(tiny_calib), max_rows=6, seqlen=512)  # the source's own ppl, separately
    assert q["ppl_reference"] == pytest.approx(alone["ppl"], rel=1e-9)
    again = evaluate(tmp_path / "o", str(tiny_calib), reference=src, max_rows=6, seqlen=512)
    assert q["ppl"] == pytest.approx(again["ppl"], rel=1e-9) and q["kl"] == pytest.approx(again["kl"], rel=1e-6)
    line = next(ln for ln in text.splitlines() if ln.startswith("quality on 6 rows"))
    assert f"{q['ppl']:.4g} (export)" in line and f"{q['ppl_reference']:.4g} (source)" in line and "KL" in line
    assert rep["seconds"] > 0 and rep["peak_rss_mb"] > 0 and "time:" in text
    assert "N:M pattern valid on all 14 N:M linears" in text


def test_compress_without_tokenizer_says_why(tiny_dir, tiny_calib, tmp_path, capsys):
    text, rep = compress(tiny_dir("llama"), tmp_path / "o", tiny_calib, capsys, "--method", "magnitude",
                         "--pattern", "2:4", json_path=tmp_path / "r.json")
    assert "quality: not measured — pass --eval-data FILE (this model has no tokenizer)" in text
    assert rep["quality"] == {"measured": False, "reason": "not measured — pass --eval-data FILE (this model has "
                                                           "no tokenizer)"}


def test_bad_eval_data_stops_before_writing(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("once upon a time\n")
    with pytest.raises(SystemExit) as e:
        main(["compress", str(tiny_dir("llama")), "--out", str(tmp_path / "o"), "--method", "magnitude", "--pattern",
              "2:4", "--eval-data", str(text)])
    assert e.value.code == 2 and not (tmp_path / "o").exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --eval-data") and "no tokenizer" in err and len(err.splitlines()) == 1


def test_api_quality_only_when_asked(tiny_dir, tiny_calib, tmp_path):
    import squeeze

    r = squeeze.compress(tiny_dir("llama"), tmp_path / "o", method="magnitude", pattern="2:4")
    assert r.report["quality"]["measured"] is False
    r = squeeze.compress(tiny_dir("llama"), tmp_path / "o2", method="magnitude", pattern="2:4",
                         eval_data=str(tiny_calib), eval_rows=2)
    assert r.report["quality"]["rows"] == 2 and r.report["quality"]["kl"] >= 0


def test_owl_reports_the_layer_sparsities_it_chose(tiny_dir, tiny_calib, tmp_path, capsys):
    text, rep = compress(tiny_dir("llama"), tmp_path / "o", tiny_calib, capsys, "--method", "wanda", "--sparsity",
                         "0.5", "--sparsity-profile", "owl", "--set", "owl_lambda=0.1", json_path=tmp_path / "r.json")
    layers = rep["done"][0]["per_layer"]["sparsity (OWL)"]
    assert len(layers) == 2 and len(set(layers)) == 2  # really per layer
    assert sum(layers) / len(layers) == pytest.approx(0.5, abs=1e-5)
    line = next(ln for ln in text.splitlines() if "sparsity (OWL) per layer" in ln)
    assert all(f"{v:.3g}" in line for v in layers)
    assert "pass wanda: sparsity 0.5" in text and "sparsity_profile owl" in text
    assert "pattern valid" not in text  # no N:M linear here


def test_teal_reports_thresholds_and_reached_sparsity(tiny_dir, tiny_calib, tmp_path, capsys):
    text, rep = compress(tiny_dir("llama"), tmp_path / "o", tiny_calib, capsys, "--method", "teal",
                         "--act-sparsity", "0.5", "--eval-data", tiny_calib, json_path=tmp_path / "r.json")
    sp = rep["quality"]["act_sparsity"]
    assert abs(sp["mean"] - 0.5) < 0.05, sp  # 1% of prefill positions stay dense: a little under 0.5
    assert set(sp["layers"]) == {"0", "1"}
    per = rep["done"][0]["per_layer"]
    assert per["target sparsity"] == [0.5, 0.5] and all(t > 0 for t in per["mlp_in threshold"])
    assert f"activation sparsity reached on {rep['quality']['rows']} held-out rows: {sp['mean']:.3f}" in text
    assert "mlp_in threshold per layer" in text
    assert "targeted linears: 0" not in text and "overall sparsity" not in text


def test_teal_without_eval_data_measures_on_calibration(tiny_dir, tiny_calib, tmp_path, capsys):
    text, rep = compress(tiny_dir("llama"), tmp_path / "o", tiny_calib, capsys, "--method", "teal",
                         "--act-sparsity", "0.4", json_path=tmp_path / "r.json")
    sp = rep["quality"]["act_sparsity"]
    assert sp["measured_on"] == "8 calibration rows" and abs(sp["mean"] - 0.4) < 0.05
    assert "activation sparsity reached on 8 calibration rows" in text


def test_drelu_reports_reached_sparsity(tiny_dir, tiny_calib, tmp_path, capsys):
    from squeeze.act_stats import activation_stats
    from squeeze.evaluation import eval_rows
    from squeeze.loading import load

    out = tmp_path / "o"
    _, rep = compress(tiny_dir("llama"), out, tiny_calib, capsys, "--method", "drelu", "--eval-data", tiny_calib,
                      "--eval-rows", "4", json_path=tmp_path / "r.json")
    sp = rep["quality"]["act_sparsity"]
    # dReLU sparsifies only the down projection's input: the token-level sparsity of act_stats, measured apart
    tls = activation_stats(load(out), eval_rows(str(tiny_calib), None, 4, 512))["layers"]
    assert sp["layers"] == pytest.approx({k: v["tls"] for k, v in tls.items()}, abs=1e-3)
    assert 0.2 < sp["mean"] < 1.0


def test_unstructured_recipe_reports_target_and_achieved(tiny_dir, tiny_calib, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- pass: magnitude\n  sparsity: 0.3\n")
    text, rep = compress(tiny_dir("llama"), tmp_path / "o", tiny_calib, capsys, "--recipe", recipe,
                         json_path=tmp_path / "r.json")
    assert "pattern valid" not in text
    u = rep["summary"]["unstructured"]
    assert u["target"] == pytest.approx(0.3)
    info = run(["info", tmp_path / "o", "--json"], capsys)
    assert u["achieved"] == pytest.approx(json.loads(info)["zero_fraction_linears"], abs=1e-6)
    assert f"target {u['target']:.4f}, achieved {u['achieved']:.4f}" in text


def test_drop_layers_lists_removed_and_kept_with_scores(tiny_dir, tiny_calib, tmp_path, capsys):
    text = run(["drop-layers", tiny_dir("llama"), "--remove", "1", "--calib", tiny_calib, "--nsamples", "4",
                "--seqlen", "32", "--out", tmp_path / "o", "--eval-data", tiny_calib, "--eval-rows", "4",
                "--json", tmp_path / "r.json"], capsys)
    rep = json.loads((tmp_path / "r.json").read_text())
    q = rep["quality"]
    assert q["rows"] == 4 and q["kl"] > 0 and f"{q['ppl_reference']:.4g} (source)" in text
    (removed,) = rep["removed"]
    assert rep["kept"] == [1 - removed] and rep["seconds"] > 0 and rep["peak_rss_mb"] > 0
    assert f"layer {removed}: {rep['scores'][removed]:.4g}  removed" in text
    assert f"layer {1 - removed}: {rep['scores'][1 - removed]:.4g}  kept" in text
    assert rep["scores"][removed] <= rep["scores"][1 - removed]


def test_tune_exit_reports_time_and_memory(tiny_dir, tiny_calib, tmp_path, capsys):
    run(["tune-exit", tiny_dir("llama"), "--calib", tiny_calib, "--out", tmp_path / "o", "--exit-layers", "1",
         "--ks", "1", "--nprompts", "1", "--prompt-len", "8", "--max-new-tokens", "4", "--json", tmp_path / "r.json"],
        capsys)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["seconds"] > 0 and rep["peak_rss_mb"] > 0


def test_eval_prints_the_references_own_ppl(tiny_dir, tiny_calib, tmp_path, capsys):
    from squeeze.evaluation import evaluate

    src = tiny_dir("llama")
    compress(src, tmp_path / "o", tiny_calib, capsys, "--method", "magnitude", "--pattern", "2:4")
    text = run(["eval", tmp_path / "o", "--data", tiny_calib, "--reference", src, "--json", tmp_path / "e.json"],
               capsys)
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["ppl_reference"] == pytest.approx(evaluate(src, str(tiny_calib))["ppl"], rel=1e-9)
    assert rep["ppl_reference"] != pytest.approx(rep["ppl"], rel=1e-6)  # really the other model
    assert "ppl_reference" in text and f"{rep['ppl_reference']:.4g}" in text
    assert rep["seconds"] > 0 and rep["peak_rss_mb"] > 0


def test_info_counts_every_file_and_prints_readable_lines(tiny_dir, tiny_calib, tmp_path, capsys):
    out = tmp_path / "o"
    compress(tiny_dir("llama"), out, tiny_calib, capsys, "--method", "teal", "--act-sparsity", "0.5")
    assert (out / "squeeze.safetensors").is_file()  # the run-time thresholds live there
    rep = json.loads(run(["info", out, "--json"], capsys))
    on_disk = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    assert rep["file_bytes"] == on_disk
    text = run(["info", out], capsys)
    assert f"files: {sum(on_disk.values()):,} bytes in {len(on_disk)} files" in text
    assert "model.layers.1.self_attn.k_proj" in text and "…" not in text  # names never cut
    assert "{'" not in text and "  teal: act_sparsity 0.5" in text


@pytest.mark.parametrize("fmt,kind", [("auto", "compressed-2:4"), ("dense", None)])
def test_recover_reads_and_writes_the_format_it_was_given(tiny_dir, tiny_calib, tmp_path, capsys, fmt, kind):
    src = tiny_dir("llama")
    pruned = tmp_path / "p"
    compress(src, pruned, tiny_calib, capsys, "--method", "wanda", "--pattern", "2:4", "--format", fmt)
    text = run(["recover", pruned, "--reference", src, "--out", tmp_path / "r", "--calib", tiny_calib, *TINY,
                "--steps", "2", "--batch-size", "2", "--eval-data", tiny_calib, "--eval-rows", "4",
                "--json", tmp_path / "r.json"], capsys)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert (rep.get("format") or {}).get("kind") == kind
    info = json.loads(run(["info", tmp_path / "r", "--json"], capsys))
    assert info["format"] == (kind or "dense")
    assert all(rec["promise_ok"] for rec in info["linears"].values())
    before, after = rep["quality_before"], rep["quality_after"]
    assert before["rows"] == after["rows"] == 4 and before["ppl_reference"] == after["ppl_reference"]
    assert f"{before['kl']:.4f} before -> {after['kl']:.4f} after" in text
    assert rep["seconds"] > 0 and rep["peak_rss_mb"] > 0


def test_minilm_quality_is_embedding_cosine(minilm_dir, tmp_path, capsys):
    text = run(["compress", minilm_dir, "--out", tmp_path / "o", "--method", "magnitude", "--pattern", "2:4",
                "--nsamples", "4", "--seqlen", "16", "--eval-rows", "16", "--json", tmp_path / "r.json"], capsys)
    q = json.loads((tmp_path / "r.json").read_text())["quality"]
    assert q["data"] == "builtin-eval" and q["rows"] == 16 and 0.0 < q["cosine_min"] <= q["cosine_mean"] < 1.0
    assert f"embedding cosine vs source mean {q['cosine_mean']:.4f}" in text


@needs_shared
def test_stories_compress_reports_ppl_of_export_and_source(tmp_path, capsys):
    from squeeze.evaluation import evaluate

    text = run(["compress", STORIES, "--out", tmp_path / "o", "--method", "wanda", "--pattern", "2:4", "--calib",
                STORIES_CALIB, "--nsamples", "16", "--seqlen", "128", "--eval-data", STORIES_EVAL, "--eval-rows", "8",
                "--json", tmp_path / "r.json"], capsys)
    q = json.loads((tmp_path / "r.json").read_text())["quality"]
    assert q["rows"] == 8 and q["ppl"] > q["ppl_reference"] > 1.0 and q["kl"] > 0.01  # 2:4 costs something
    assert q["ppl_reference"] == pytest.approx(evaluate(STORIES, str(STORIES_EVAL), max_rows=8, seqlen=512)["ppl"])
    assert f"{q['ppl_reference']:.4g} (source)" in text
