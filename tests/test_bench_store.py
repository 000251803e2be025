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
        for column, (source, data_ratio, spread, gmac_ratio) in enumerate(run):
            expected = 1.5 * sum(share[k] / rates[k][column] for k in share) * rates[base][column]
            assert abs(float(data_ratio) - expected) < 0.02 + 0.01 * expected, source
            assert spread == f"{data_ratio}-{data_ratio}", source  # --quick measures one round
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


def test_whole_run_ratio_is_the_median_of_the_rounds_own_ratios():
    """A round measured while the machine ran at half speed changes no round's ratio: the drift cancels."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import bench_store
    shapes = [(4, 112, 20, 0.5), (16, 224, 5, 0.5)]
    macs = {(4, 112): 1.0, (16, 224): 8.0}
    steady = {(4, 112): 400.0, (16, 224): 100.0}
    rounds = [{key: {name: rate * speed for name in bench_store.SOURCES} for key, rate in steady.items()}
              for speed in (1.0, 0.5, 0.6)]
    rounds[2][(4, 112)]["store"] *= 2  # one round twice as fast at the small shape, from the store only
    text, figures = bench_store.report("X3D-M", shapes, macs, rounds, (450, 300))
    expected = 1.5 * (0.5 / 400 + 0.5 / 100) * 100  # 0.9375 in every round without the outlier
    assert abs(figures["data_ratio"]["jpeg"] - expected) < 1e-9
    assert abs(figures["data_ratio"]["store"] - expected) < 1e-9  # the outlier round is not the median
    row = next(r for r in _rows(text, "data CPU-s") if r[0] == "store")
    assert row[1:3] == ["0.94", f"{1.5 * (0.5 / 800 + 0.5 / 100) * 100:.2f}-0.94"]
