"""``spectralcache eval`` / ``plot`` argument handling (no model is loaded)."""

from __future__ import annotations

import json

import pytest

from spectralcache.cli import build_parser, main


def _parse(argv: list[str]):
    return build_parser(argv[0]).parse_args(argv)


def test_defaults_and_subcommands():
    a = _parse(["eval", "--out", "d"])
    assert (
        a.eval_command is None and a.tasks == ["niah_single_1", "niah_multikey_2", "vt"] and a.samples == 20
    )
    a = _parse(["eval", "needle", "--out", "d", "--lengths", "1k,2048", "--depths", "0,0.5,1"])
    assert a.eval_command == "needle" and a.lengths == [1024, 2048] and a.depths == [0.0, 0.5, 1.0]
    a = _parse(["eval", "perplexity", "--out", "d", "--prefill", "2048", "--continue", "512"])
    assert (a.prefill, a.cont, a.mode) == (2048, 512, "step")
    a = _parse(
        ["eval", "tasks", "--out", "d", "--methods", "baseline,spectral:aggressive", "--device", "cuda"]
    )
    assert [m.name for m in a.methods] == ["baseline", "spectral:aggressive"] and a.device == "cuda"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "--out", "d", "--methods", "spectral:nope"], "unknown SpectralConfig preset"),
        (["eval", "--out", "d", "--methods", "streaming:sinks=4"], "window"),
        (["eval", "--out", "d", "--lengths", "4096,abc"], "comma-separated integers"),
        (["eval", "--out", "d", "--lengths", "0"], "positive"),
        (["eval", "--out", "d", "--samples", "0"], "positive"),
        (["eval", "needle", "--out", "d", "--depths", "0,1.5"], r"\[0, 1\]"),
        (["eval", "needle", "--lengths", "1024"], "--out"),
        (["eval", "perplexity", "--out", "d", "--mode", "fast"], "invalid choice"),
        (["eval", "--out", "d", "--dtype", "int8"], "invalid choice"),
        (["eval", "--out", "d", "--tasks", "vt,,cwe"], "empty name"),
    ],
)
def test_argument_errors_exit_2_with_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert pytest.importorskip("re").search(needle, capsys.readouterr().err)


def test_bad_threads_is_an_error(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    assert main(["eval", "--out", str(tmp_path), "--threads", "0"]) == 2
    assert "threads must be >= 1" in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_bare_eval_without_out_is_an_error(capsys):
    assert main(["eval", "--tasks", "vt"]) == 2
    assert "--out" in capsys.readouterr().err


def test_plot_errors_and_redraw(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 1  # exists, but holds no results
    # a perplexity result is redrawn from its JSON alone
    d = tmp_path / "ppl" / "perplexity"
    d.mkdir(parents=True)
    rows = [
        {"method": "baseline", "error": None, "perplexity": 10.0, "compression_ratio": 1.0,
         "protocol": {"prefill": 8, "continue": 4, "segments": 1, "mode": "step"}},
        {"method": "spectral:default", "error": None, "perplexity": 11.0, "compression_ratio": 2.0,
         "protocol": {"prefill": 8, "continue": 4, "segments": 1, "mode": "step"}},
    ]  # fmt: skip
    (d / "summary.json").write_text(json.dumps(rows))
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "ppl" / "perplexity_vs_ratio.png").stat().st_size > 0
