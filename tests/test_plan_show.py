"""`nanoflow plan show` on CPU: records one step's timeline under a plan and writes the Gantt PNG."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from nanoflow.entrypoints.cli import main  # noqa: E402
from nanoflow.entrypoints.plan_show import draw_timeline  # noqa: E402


def test_plan_show_writes_a_png(tmp_path, capsys):
    out = tmp_path / "plan.png"
    rc = main(["plan", "show", "overlap-2", "--out", str(out), "--device", "cpu", "--batch-tokens", "64",
               "--decode-fraction", "0.5", "--context", "16", "--steps", "0"])
    assert rc == 0
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    text = capsys.readouterr().out
    assert "compute" in text and "memory" in text


def test_draw_timeline_layer_window_and_errors(tmp_path):
    entries = [  # two layers of a two-stream pipeline
        {"layer": 0, "op": "qkv_gemm", "resource": "compute", "lo": 0, "hi": 4, "stream": "compute",
         "start_ms": 0.0, "end_ms": 1.0},
        {"layer": 0, "op": "decode_attn", "resource": "memory", "lo": 0, "hi": 4, "stream": "memory",
         "start_ms": 1.0, "end_ms": 3.0},
        {"layer": 1, "op": "qkv_gemm", "resource": "compute", "lo": 0, "hi": 4, "stream": "compute",
         "start_ms": 1.5, "end_ms": 2.5},
        {"layer": 1, "op": "decode_attn", "resource": "memory", "lo": 0, "hi": 4, "stream": "memory",
         "start_ms": 3.0, "end_ms": 4.0},
    ]
    path, stats = draw_timeline(entries, tmp_path / "t.png", layer=0, title="t")
    assert path.is_file() and stats["layer"] == 0
    assert stats["span_ms"] == pytest.approx(3.0)
    assert stats["overlap_ms"] == pytest.approx(1.0)  # layer 1's qkv under layer 0's attention
    assert stats["busy_ms"] == pytest.approx({"compute": 2.0, "memory": 2.0})
    with pytest.raises(ValueError, match="layer 7"):
        draw_timeline(entries, tmp_path / "x.png", layer=7)
    with pytest.raises(ValueError, match="empty"):
        draw_timeline([], tmp_path / "x.png")
