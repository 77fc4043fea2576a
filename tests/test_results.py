"""jdd.results: results.json / results.md with the gain over random / centroid and the fraction of full."""
import json

import pytest

from jdd import results


def res(mean, mode="full", seeds=(1.0, 2.0)):
    return {"top1_mean": mean, "top1_std": 0.5, "top1_per_seed": list(seeds), "wall_time_s": 1.0,
            "protocol": {"name": f"proto-{mode}", "mode": mode}, "backbone": "bb"}


def test_gains_and_fraction_in_json_and_markdown(tmp_path):
    out = {"distilled (clp)": res(60.0), "random": res(30.0), "centroid": res(45.5),
           "full": res(80.0, mode="features")}
    jpath, mpath = results.write_results(tmp_path, out, meta={"dataset": "toy"})
    saved = json.loads(open(jpath).read())
    d = saved["results"]["distilled (clp)"]
    assert d["gain_over_random"] == pytest.approx(30.0)
    assert d["gain_over_centroid"] == pytest.approx(14.5)
    assert d["fraction_of_full"] == pytest.approx(0.75)
    # a reference is not compared with itself; the centroid is compared with random
    assert "gain_over_random" not in saved["results"]["random"]
    assert saved["results"]["centroid"]["gain_over_random"] == pytest.approx(15.5)
    assert "gain_over_centroid" not in saved["results"]["centroid"]
    assert "fraction_of_full" not in saved["results"]["full"]
    assert set(saved["comparisons"]) == {"gain_over_random", "gain_over_centroid", "fraction_of_full"}
    assert saved["meta"] == {"dataset": "toy"}
    table = open(mpath).read()
    assert "| method | top-1 (%) | std | vs random (pts) | vs centroid (pts) | of full |" in table
    assert "| distilled (clp) | 60.00 | 0.50 | +30.00 | +14.50 | 75.0% | 2 |" in table
    assert "| random | 30.00 | 0.50 |  | -15.50 | 37.5% |" in table
    # the caller's dicts are not modified
    assert "gain_over_random" not in out["distilled (clp)"]


def test_no_references_keeps_the_plain_table(tmp_path):
    jpath, mpath = results.write_results(tmp_path, {"distilled (lgm)": res(50.0)})
    saved = json.loads(open(jpath).read())
    assert "comparisons" not in saved
    assert set(saved["results"]["distilled (lgm)"]) == set(res(50.0))
    assert "vs random" not in open(mpath).read()
    assert "| distilled (lgm) | 50.00 | 0.50 | 2 |" in open(mpath).read()


def test_references_from_another_results_file_and_mode_mismatch(tmp_path):
    base = tmp_path / "baselines"
    results.write_results(base, {"random": res(20.0, mode="features"), "centroid": res(40.0), "full": res(90.0)})
    refs = results.load_results(str(base))
    jpath, _ = results.write_results(tmp_path / "run", {"distilled (clp)": res(45.0)}, references=refs)
    d = json.loads(open(jpath).read())["results"]["distilled (clp)"]
    assert d["gain_over_centroid"] == pytest.approx(5.0) and d["fraction_of_full"] == pytest.approx(0.5)
    # random was scored features-only, the set under the full protocol: no gain is claimed across modes
    assert "gain_over_random" not in d
