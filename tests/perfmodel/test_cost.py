from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.perfmodel.cost import CostConfig, compare, cost, load_config, table, unsourced

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "cost"


def config(**over) -> dict:
    """One $1000, 100 W machine at $0.10/kWh, busy half the time for a year, serving 10 tok/s."""
    machine = {"name": "box", "count": 1, "price_usd": 1000, "power_w": 100}
    machine.update(over.pop("machine", {}))
    base = {"name": "one-box", "machines": [machine], "electricity_usd_per_kwh": 0.10, "utilisation": 0.5,
            "lifetime_years": 1, "tokens_per_s": 10}
    base.update(over)
    return base


def report(**over):
    return cost(CostConfig.model_validate(config(**over)))


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "cost.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_hand_worked_example():
    r = report()
    busy_h = 365.25 * 24 * 0.5  # 4383 h: a Julian year (8766 h) at 50 %
    assert busy_h == 4383
    assert r.capex_usd == 1000
    assert r.energy_kwh_per_year == pytest.approx(438.3)  # 100 W × 4383 h = 438,300 Wh
    assert r.energy_usd_lifetime == pytest.approx(43.83)  # 438.3 kWh × $0.10 × 1 year
    assert r.total_usd_lifetime == pytest.approx(1043.83)
    assert r.tokens_lifetime == pytest.approx(157_788_000)  # 10 tok/s × 3600 s × 4383 h
    assert r.usd_per_million_tokens == pytest.approx(1043.83 / 157.788)  # 6.6154
    assert r.tokens_per_usd == pytest.approx(157_788_000 / 1043.83)  # 151,163
    assert r.capex_share == pytest.approx(1000 / 1043.83)
    assert r.energy_share == pytest.approx(43.83 / 1043.83)
    assert r.capex_share + r.energy_share + r.extra_share == pytest.approx(1)


def test_idle_power_counts_over_idle_hours_only():
    # 100 W over 2191.5 busy h + 20 W over 6574.5 idle h = 219,150 + 131,490 Wh
    r = report(utilisation=0.25, machine={"idle_power_w": 20})
    assert r.energy_kwh_per_year == pytest.approx(350.64)
    assert r.tokens_lifetime == pytest.approx(10 * 3600 * 2191.5)  # idle hours serve nothing


def test_count_multiplies_cost_not_tokens():
    one, three = report(), report(machine={"count": 3})
    assert three.capex_usd == 3 * one.capex_usd
    assert three.energy_kwh_per_year == pytest.approx(3 * one.energy_kwh_per_year)
    assert three.tokens_lifetime == one.tokens_lifetime  # tokens_per_s is the whole configuration's


def test_lifetime_amortises_capex():
    one, three = report(), report(lifetime_years=3)
    assert three.capex_usd == one.capex_usd
    assert three.energy_usd_lifetime == pytest.approx(3 * one.energy_usd_lifetime)
    assert three.tokens_lifetime == pytest.approx(3 * one.tokens_lifetime)
    assert three.usd_per_million_tokens == pytest.approx((1000 + 3 * 43.83) / (3 * 157.788))


def test_extra_cost_is_per_year():
    r = report(lifetime_years=2, extra_usd_per_year=250)
    assert r.extra_usd_lifetime == 500
    assert r.total_usd_lifetime == pytest.approx(1000 + 2 * 43.83 + 500)
    assert r.extra_share == pytest.approx(500 / r.total_usd_lifetime)


def test_more_tokens_per_second_is_cheaper_per_token():
    costs = [report(tokens_per_s=t).usd_per_million_tokens for t in (1, 10, 100, 1000)]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == 4
    assert costs[0] == pytest.approx(10 * costs[1])  # $/Mtok is inversely proportional


def test_dearer_machines_and_power_cost_more_per_token():
    by_price = [report(machine={"price_usd": p}).usd_per_million_tokens for p in (0, 500, 1000, 5000)]
    by_kwh = [report(electricity_usd_per_kwh=e).usd_per_million_tokens for e in (0, 0.1, 0.3)]
    by_power = [report(machine={"power_w": w}).usd_per_million_tokens for w in (0, 100, 1000)]
    for costs in (by_price, by_kwh, by_power):
        assert costs == sorted(costs) and len(set(costs)) == len(costs)


def test_busier_is_cheaper_per_token_even_counting_idle_power():
    costs = [report(utilisation=u, machine={"idle_power_w": 50}).usd_per_million_tokens for u in (0.1, 0.5, 1.0)]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == 3


def test_compare_ratios():
    a = report()
    slower = report(tokens_per_s=10 / 1.15)  # same cost, 1.15x fewer tokens
    dearer = report(machine={"price_usd": 2000, "power_w": 0})
    assert compare(a, slower)["cost_efficiency"] == pytest.approx(1.15)
    assert compare(a, slower)["total_cost"] == pytest.approx(1.0)
    assert compare(slower, a)["cost_efficiency"] == pytest.approx(1 / 1.15)
    assert compare(a, dearer)["total_cost"] == pytest.approx(2000 / 1043.83)
    assert compare(a, dearer)["a"] == "one-box"


@pytest.mark.parametrize(("change", "field"), [
    ({"machine": {"price_usd": -1}}, "machines.0.price_usd"),
    ({"machine": {"count": 0}}, "machines.0.count"),
    ({"machine": {"count": True}}, "machines.0.count"),
    ({"machine": {"power_w": -5}}, "machines.0.power_w"),
    ({"utilisation": 0}, "utilisation"),
    ({"utilisation": 1.01}, "utilisation"),
    ({"lifetime_years": 0}, "lifetime_years"),
    ({"tokens_per_s": 0}, "tokens_per_s"),
    ({"tokens_per_s": "10"}, "tokens_per_s"),
    ({"electricity_usd_per_kwh": -0.1}, "electricity_usd_per_kwh"),
    ({"machines": []}, "machines"),
    ({"hosting": 5}, "hosting"),
    ({"machine": {"watts": 5}}, "machines.0.watts"),
])
def test_bad_field_is_named(tmp_path, change, field):
    path = write(tmp_path, config(**change))
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert f"{field}:" in str(err.value)
    assert str(path) in str(err.value)


def test_every_bad_field_is_reported(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(write(tmp_path, config(utilisation=0, machine={"price_usd": -1})))
    assert "utilisation:" in str(err.value) and "machines.0.price_usd:" in str(err.value)


@pytest.mark.parametrize(("data", "words"), [
    ("{not json", "Invalid JSON"),
    (config(machine={"price_usd": 0, "power_w": 0}), "costs nothing"),
    (config(machines=[config()["machines"][0]] * 2), "unique"),
])
def test_whole_file_problems(tmp_path, data, words):
    with pytest.raises(ValueError) as err:
        load_config(write(tmp_path, data))
    assert words in str(err.value)


def test_utilisation_one_and_integers_are_accepted(tmp_path):
    c = load_config(write(tmp_path, config(utilisation=1, lifetime_years=3, electricity_usd_per_kwh=0)))
    assert c.utilisation == 1.0
    assert cost(c).energy_usd_lifetime == 0


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        load_config(tmp_path / "absent.json")


def test_unsourced_lists_numbers_without_a_source():
    c = CostConfig.model_validate(config(sources={"utilisation": "assumption: half busy", "box.count": " "}))
    assert unsourced(c) == ["electricity_usd_per_kwh", "lifetime_years", "tokens_per_s", "box.count",
                            "box.price_usd", "box.power_w"]
    with_idle = CostConfig.model_validate(config(machine={"idle_power_w": 5}, extra_usd_per_year=1))
    assert {"box.idle_power_w", "extra_usd_per_year"} <= set(unsourced(with_idle))


def test_table_has_a_row_per_report():
    rows = table([report(), report(name="fast", tokens_per_s=100)]).splitlines()
    assert len(rows) == 4  # header, rule, two rows
    assert rows[2].startswith("one-box") and "6.615" in rows[2] and "158M" in rows[2]
    assert rows[3].startswith("fast") and "0.6615" in rows[3]
    assert len({len(r) for r in rows}) == 1  # aligned


def test_report_is_json_ready():
    assert json.loads(json.dumps(report().model_dump()))["tokens_lifetime"] == pytest.approx(157_788_000)


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.json")), ids=lambda p: p.name)
def test_bench_configs_load_and_cite_every_number(path):
    c = load_config(path)
    assert unsourced(c) == []
    assert cost(c).usd_per_million_tokens > 0


def test_bench_configs_exist():
    names = {p.name for p in BENCH.glob("*.json")}
    assert {"mac-studio-m2-ultra-x2.json", "mac-studio-m2-ultra-x4.json", "h100.json"} <= names
