"""The CLI: tables and --json, and one-line errors with exit code 2 for bad input."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.graph import NeuronGraph
from workbench.neurons import NeuronSet

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"


def _fails_cleanly(result, match):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert match in result.stderr


def test_inspect_json_lists_sites(tiny_folders):
    result = _run("inspect", tiny_folders["dit"], "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["family"] == "dit" and data["pipeline"] == "PixArtAlphaPipeline"
    values = [s for s in data["sites"] if s["role"] == "cross_attn_value"]
    assert len(values) == 2 and all(s["bias"] for s in values)
    assert {"path", "role", "block", "in_features", "out_features", "bias"} <= set(data["sites"][0])
    assert sum(s["out_features"] for s in data["sites"]) == data["neurons"]


def test_inspect_table(tiny_folders):
    result = _run("inspect", tiny_folders["mmdit"])
    assert result.exit_code == 0
    assert "family" in result.stdout and "mmdit" in result.stdout and "context_value" in result.stdout


def test_generate_writes_png_and_ablation_changes_it(tiny_folders, tmp_path):
    plain = tmp_path / "plain.png"
    result = _run("generate", tiny_folders["unet"], "--prompt", "a red circle", "--steps", "2", "--out", plain,
                  "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"][0]["path"] == str(plain)
    sites = json.loads(_run("inspect", tiny_folders["unet"], "--json").stdout)["sites"]
    values = [s for s in sites if s["role"] == "cross_attn_value"]
    neurons = tmp_path / "neurons.json"
    NeuronSet({s["path"]: range(s["out_features"]) for s in values}).save(neurons)
    ablated = tmp_path / "ablated.png"
    result = _run("generate", tiny_folders["unet"], "--prompt", "a red circle", "--steps", "2", "--out", ablated,
                  "--ablate", neurons)
    assert result.exit_code == 0, result.output
    assert plain.read_bytes() != ablated.read_bytes()


def test_generate_several_prompts(tiny_folders, tmp_path):
    result = _run("generate", tiny_folders["mmdit"], "--prompt", "a cat", "--prompt", "a dog", "--steps", "1",
                  "--out", tmp_path / "img.png")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0.png", "img-1.png"]


def test_graph_command_writes_loadable_json(tiny_folders, tmp_path):
    out = tmp_path / "graph.json"
    result = _run("graph", tiny_folders["unet"], "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["edges"]["skip"] == 4
    assert len(NeuronGraph.load(out).sites) == json.loads(result.stdout)["sites"]


def test_existing_output_is_never_overwritten(tiny_folders, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    _fails_cleanly(_run("generate", tiny_folders["unet"], "--prompt", "a cat", "--out", out), "already exists")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("args, match", [
    (["inspect", "{tmp}/missing"], "not found"),
    (["inspect", "{tmp}"], "no model_index.json"),
    (["inspect", "{unet}", "--dtype", "float7"], "unknown dtype"),
    (["inspect", "{unet}", "--device", "quantum"], "device"),
    (["inspect", "{unet}", "--family", "rnn"], "unknown family"),
    (["generate", "{unet}", "--prompt", "a cat", "--out", "{tmp}/no/such/dir/x.png"], "does not exist"),
    (["generate", "{unet}", "--prompt", "a cat", "--out", "{tmp}/x.jpg"], "must end in .png"),
    (["generate", "{unet}", "--prompt", "a cat", "--out", "{tmp}/x.png", "--ablate", "{tmp}/none.json"], "not found"),
    (["graph", "{unet}", "--out", "{tmp}"], "already exists"),
    (["testbed", "localize", "{unet}", "--sites", "down.1,,up.0"], "unknown NeMo site set"),
    (["testbed", "localize", "{unet}", "--sites", "every"], "no value site in block 'every'; use official, all_value"),
    (["testbed", "localize", "{unet}", "--methods", "ablation,nemo", "--sites", "up.7"], "no value site in block"),
    (["testbed", "localize", "{unet}", "--search-score", "pairwise"], "unknown NeMo search score"),
    (["testbed", "localize", "{unet}", "--wanda-base", "coco"], "unknown Wanda base 'coco'"),
    (["testbed", "localize", "{unet}", "--methods", "wanda", "--wanda-roles", "attn_val"], "unknown role 'attn_val'"),
    (["localize", "wanda", "{unet}", "--prompts", "{tmp}/prompts.txt", "--roles", ",", "--out", "{tmp}/w.json"],
     "at least one role"),
    (["testbed", "localize", "{unet}", "--methods", "nemo,dosage"], "unknown method 'dosage'"),
    (["testbed", "localize", "{unet}", "--legacy", "--nemo-steps", "1"], ">= 2 with legacy"),
    (["testbed", "localize", "{unet}", "--methods", "dose", "--dose-fractions", "0.1,2"], "--dose-fractions must be"),
    (["testbed", "localize", "{unet}", "--methods", "salun", "--salun-fraction", "0"], "fraction must be in"),
    (["testbed", "localize", "{unet}", "--methods", "salun", "--salun-roles", "cross_attn_vaule"], "unknown role"),
    (["localize", "salun", "{unet}", "--prompts", "{tmp}/prompts.txt", "--roles", "ffn", "--out", "{tmp}/s.json"],
     "unknown role 'ffn'"),
    (["testbed", "localize", "{unet}", "--methods", ","], "give at least one method"),
    (["testbed", "localize", "{unet}", "--seeds", "0"], "seeds >= 1"),
    (["testbed", "localize", "{unet}", "--testbed", "{tmp}/other.json"], "held-out captions"),
    (["localize", "nemo", "{unet}", "--prompts", "{tmp}/prompts.txt", "--holdout", "{tmp}/prompts.txt",
      "--threshold", "1.5"], "outside (-1, 1)"),
    (["localize", "nemo", "{unet}", "--prompts", "{tmp}/prompts.txt", "--holdout", "{tmp}/prompts.txt",
      "--tie-margin", "-1"], "tie_margin must be in"),
    (["localize", "nemo", "{unet}", "--prompts", "{tmp}/prompts.txt", "--holdout", "{tmp}/prompts.txt",
      "--out", "{tmp}/a.json", "--graph", "{tmp}/a.json"], "same file"),
    (["localize", "wanda", "{unet}", "--prompts", "{tmp}/prompts.txt", "--out", "{tmp}/taken.json"],
     "taken.mask.safetensors already exists"),
    (["localize", "salun", "{unet}", "--prompts", "{tmp}/prompts.txt", "--images", "{tmp}/images.txt",
      "--out", "{tmp}/s.json"], "not a readable image"),
    (["localize", "ablation", "{unet}", "--prompts", "{tmp}/prompts.txt", "--concept", "subject=house"],
     "needs both concept"),
    (["localize", "ablation", "{unet}", "--prompts", "{tmp}/prompts.txt", "--concept", "house",
      "--classifier", "{tmp}"], "must read head=label"),
])
def test_bad_input_gives_one_line_and_exit_2(tiny_folders, tmp_path, args, match):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "other.json").write_text('{"format": "not a testbed"}')
    (tmp_path / "taken.mask.safetensors").write_bytes(b"a mask kept from an earlier run")
    (tmp_path / "images.txt").write_text(f"{tmp_path / 'prompts.txt'}\n")
    filled = [a.format(tmp=tmp_path, unet=tiny_folders["unet"]) for a in args]
    _fails_cleanly(_run(*filled), match)


def test_unwritable_output_folder(tiny_folders, tmp_path, monkeypatch):
    # permission bits do not stop root (CI runs as root), so make the folder read-only for os.access
    monkeypatch.setattr("workbench.io.folder_writable", lambda folder: False)
    _fails_cleanly(_run("generate", tiny_folders["unet"], "--prompt", "a cat", "--out", tmp_path / "x.png"),
                   "not writable")
    assert not (tmp_path / "x.png").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = _run("--debug", "inspect", tmp_path / "missing")
    assert result.exit_code != 0 and result.exception is not None


def test_demo_finds_memorization_in_the_shipped_unet(tmp_path):
    result = _run("demo", "--out", tmp_path, "--checkpoints", SHIPPED, "--seeds", "2", "--calibration", "2", "--ordinary", "1",
                  "--memorized", "1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    memorized, ordinary = summary["captions"]
    assert memorized["kind"] == "verbatim" and ordinary["kind"] == "ordinary"
    assert "private-astronaut" in memorized["nearest_training_id"]  # the caption brings back its own photo
    assert max(memorized["replication_ssim"]) > max(ordinary["replication_ssim"])
    assert memorized["nemo"] > ordinary["nemo"]
    assert all(isinstance(summary["thresholds"][k], float) for k in ("nemo", "wen"))
    page = Path(summary["files"]["page"]).read_text()
    found = memorized["nemo_localization"]  # detected, so NeMo localized it and switched it off
    assert found["count"] == sum(len(v) for v in found["neurons"].values()) > 0
    assert len(found["replication_ssim_after"]) == 2 and "nemo_localization" not in ordinary
    # training image, generations, nearest, generations after NeMo; the ordinary caption has no own image
    assert page.count("<img ") == (1 + 2 + 1 + 2) + (2 + 1)
    assert json.loads(Path(summary["files"]["summary"]).read_text()) == summary


def test_demo_without_checkpoints_says_where_to_run(tmp_path):
    _fails_cleanly(_run("demo", "--out", tmp_path, "--checkpoints", tmp_path / "none"), "repository root")