"""bench/pipeline.py runs end to end on a tiny setting and prints its table."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pipeline_benchmark_runs_and_prints_table(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pipeline.py"), "--num_images=6", "--num_shards=2",
         "--seconds=0.5", "--rounds=1", "--image_size=32", "--batch_size=4", "--warmup_batches=1",
         f"--work_dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("wrote 6 JPEGs into 2 shards") for line in lines), out.stdout
    row = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert all(float(c) > 0 for c in cells), row
