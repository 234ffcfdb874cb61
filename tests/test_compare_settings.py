import csv

import numpy as np
import pytest

from scripts.compare_settings import main


def write_curve(path, values):
    """values: {(acquisition, seed, cycle): miou}"""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["acquisition", "seed", "cycle", "labelled_pixels", "miou"])
        writer.writeheader()
        for (acquisition, seed, cycle), miou in values.items():
            writer.writerow({"acquisition": acquisition, "seed": seed, "cycle": cycle,
                             "labelled_pixels": 100 * (cycle + 1), "miou": miou})


def test_each_setting_is_read_at_its_last_cycle_and_paired_with_its_random(tmp_path, capsys):
    base, variant = tmp_path / "base.csv", tmp_path / "variant.csv"
    write_curve(base, {("random", 0, 0): 0.1, ("random", 0, 1): 0.30, ("random", 1, 1): 0.34,
                       ("margin", 0, 1): 0.50, ("margin", 1, 1): 0.40, ("margin", 0, 0): 0.9})
    # the variant has no random rows and three cycles; seed 2 has no random partner
    write_curve(variant, {("margin", 0, 2): 0.35, ("margin", 1, 2): 0.44, ("margin", 2, 2): 0.7,
                          ("balent", 0, 2): 0.6, ("balent", 1, 2): 0.2, ("margin", 0, 1): 0.99})
    assert main([f"base={base}", f"variant={variant}", "--random-from", "variant=base",
                 "--plot", str(tmp_path / "s.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    margin = [50.0, 40.0]
    assert lines[2] == f"| base (1) | margin | {np.mean(margin):.1f} ± {np.std(margin):.1f} | +13.0 (+20.0, +6.0) | 1 |"
    assert lines[3] == "| base (1) | random | 32.0 ± 2.0 | - | 2 |"
    # variant: margin mean 49.7 ranks above balent 40.0; paired with base's random on seeds 0, 1 only
    assert lines[4].startswith(f"| variant (2) | margin | {np.mean([35, 44, 70]):.1f} ± {np.std([35, 44, 70]):.1f} | "
                               "+7.5 (+5.0, +10.0) [random of base] | 1 |")
    assert lines[5] == "| variant (2) | balent | 40.0 ± 20.0 | +8.0 (+30.0, -14.0) [random of base] | 2 |"
    assert (tmp_path / "s.png").stat().st_size > 0


def test_a_setting_paired_with_another_gives_per_seed_changes_and_the_spread_verdict(tmp_path, capsys):
    full, decoder = tmp_path / "full.csv", tmp_path / "decoder.csv"
    write_curve(full, {("margin", 0, 1): 0.50, ("margin", 1, 1): 0.40, ("balent", 0, 1): 0.30, ("balent", 1, 1): 0.32,
                       ("random", 0, 1): 0.2})
    write_curve(decoder, {("margin", 0, 1): 0.47, ("margin", 1, 1): 0.45, ("balent", 0, 1): 0.40, ("balent", 1, 1): 0.36})
    assert main([f"full={full}", f"decoder={decoder}", "--paired-with", "decoder=full"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("| setting vs other | acquisition | other mIoU (%) | setting mIoU (%) | change: mean (seeds) | "
                              "within other's spread |"):]
    # balent: +10.0, +4.0 -> +7.0, beyond full's std of 1.0; margin: -3.0, +5.0 -> +1.0, within full's 5.0
    assert table[2] == "| decoder vs full | balent | 31.0 ± 1.0 | 38.0 ± 2.0 | +7.0 (+10.0, +4.0) | no |"
    assert table[3] == "| decoder vs full | margin | 45.0 ± 5.0 | 46.0 ± 1.0 | +1.0 (-3.0, +5.0) | yes |"
    assert len(table) == 4  # random is in one setting only
    with pytest.raises(SystemExit, match="--paired-with decoder=nope"):
        main([f"full={full}", f"decoder={decoder}", "--paired-with", "decoder=nope"])


def test_cli_names_bad_settings(tmp_path):
    path = tmp_path / "c.csv"
    write_curve(path, {("random", 0, 0): 0.1})
    with pytest.raises(SystemExit, match="expected <name>=<value>"):
        main([str(path)])
    with pytest.raises(SystemExit, match="a curve.csv written by"):
        main([f"a={tmp_path / 'missing.csv'}"])
    with pytest.raises(SystemExit, match="both must be settings"):
        main([f"a={path}", "--random-from", "a=b"])
