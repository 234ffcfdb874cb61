import csv

import numpy as np
import pytest

from scripts.compare_curves import main, paired_table


def rows(acquisition, values):
    """values: {(seed, cycle): miou}"""
    return [{"acquisition": acquisition, "seed": str(s), "cycle": str(c), "labelled_pixels": str(1000 * (c + 1)),
             "miou": str(m)} for (s, c), m in values.items()]


def test_paired_table_pairs_by_seed_and_skips_unshared_cycles():
    first = rows("balent", {(0, 0): 0.10, (1, 0): 0.12, (0, 1): 0.11, (1, 1): 0.13, (0, 2): 0.2})
    second = rows("balent", {(0, 0): 0.11, (1, 0): 0.11, (0, 1): 0.14, (2, 1): 0.5})
    lines = paired_table(first, second, ("real", "real + syn")).splitlines()
    assert lines[0] == "| cycle | labelled px | real | real + syn | paired change (seeds) |"
    assert len(lines) == 4  # header, rule, cycles 0 and 1; cycle 2 only in the first run
    # cycle 0: both seeds; changes +1.0 and -1.0 points, mean 0
    assert lines[2] == (f"| 0 | 1000 | {np.mean([10, 12]):.1f} ± {np.std([10, 12]):.1f} | "
                        f"{np.mean([11, 11]):.1f} ± 0.0 | +0.0 (+1.0, -1.0; seeds 0, 1) |")
    # cycle 1: only seed 0 is in both runs, so only it is paired; the cells keep every seed
    assert lines[3].startswith(f"| 1 | 2000 | 12.0 ± 1.0 | {np.mean([14, 50]):.1f} ± {np.std([14, 50]):.1f} |")
    assert lines[3].endswith("| +3.0 (+3.0; seeds 0) |")


def test_cli_names_a_missing_file_or_acquisition(tmp_path, capsys):
    path = tmp_path / "curve.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["acquisition", "seed", "cycle", "labelled_pixels", "miou"])
        writer.writeheader()
        writer.writerows(rows("bald", {(0, 0): 0.1}))
    with pytest.raises(SystemExit, match="no rows for acquisition 'balent'"):
        main([f"{path}:balent", f"{path}:bald"])
    with pytest.raises(SystemExit, match="existing curve.csv"):
        main([f"{tmp_path / 'missing.csv'}:bald", f"{path}:bald"])
    assert main([f"{path}:bald", f"{path}:bald", "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "+0.0 (+0.0; seeds 0)" in capsys.readouterr().out
