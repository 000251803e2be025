"""bench/bench_store.py --quick end to end: its tables agree with their own formulas."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(text, header):
    """Cells of the Markdown table whose header line holds `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and header in line)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_quick_bench_tables_follow_their_formulas(tmp_path):
    out = tmp_path / "table.md"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_store.py"), "--quick", "--out",
                             str(out)], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for model, base, gpu_rate in (("X3D-S", "13x160", 283.0), ("X3D-M", "16x224", 121.0)):
        section = text.split(f"### {model} Multigrid recipe")[1].split("###")[0]
        assert "GPU need at a shape = " in section
        shapes = _rows(section, "share")
        assert len(shapes) == 8 and abs(sum(float(r[1]) for r in shapes) - 1) < 0.005
        macs = {r[0].split()[0]: float(r[2]) for r in shapes}
        rates = {r[0].split()[0]: [float(x) for x in r[3:]] for r in shapes}
        share = {r[0].split()[0]: float(r[1]) for r in shapes}
        run = _rows(section, "data CPU-s")
        for column, (source, data_ratio, gmac_ratio) in enumerate(run):
            expected = 1.5 * sum(share[k] / rates[k][column] for k in share) * rates[base][column]
            assert abs(float(data_ratio) - expected) < 0.02 + 0.01 * expected, source
            assert abs(float(gmac_ratio) - 1.5 * sum(share[k] * macs[k] for k in share) / macs[base]) < 0.02
        for row in _rows(section, "GPU need clips/s"):
            need = gpu_rate * macs[base] / macs[row[0]]
            assert abs(float(row[1]) - need) <= 0.01 * need + 1 and abs(float(row[2]) - 2 * need) <= 0.01 * need + 1
            for cell, column in zip(row[4:], (2, 3, 4)):  # jpeg, store, store+160
                value, verdict = re.match(r"(\d+) \((yes|NO)\)", cell).groups()
                assert abs(int(value) - 16 * rates[row[0]][column]) <= 1 + 0.01 * int(value)
                assert (verdict == "yes") == (16 * rates[row[0]][column] >= 2 * need)
    quality = {r[0]: float(r[1]) for r in _rows(text, "JPEG quality")}
    assert quality["store files (default)"] == quality["92 (default)"] > quality["90"]
    assert len(_rows(text, "| target")) == 7
