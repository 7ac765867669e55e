"""Turning a run into the issue's JSON shape, the targets, and a Markdown table."""

from __future__ import annotations

import math
from typing import Any

Json = dict[str, Any]

TARGETS = (
    # (key, description, ratio or value, threshold, higher is better)
    ("api_vs_pgbench", "API payments/s >= 0.5 x pgbench same txn", 0.5, True),
    ("handler_vs_pgqueuer_drain", "handler events/s >= 2 x pgqueuer drain", 2.0, True),
    ("webhooks_vs_pgqueuer_throughput", "webhook deliveries/s >= 1 x pgqueuer throughput",
     1.0, True),
    ("e2e_p99_ms", "end-to-end p99 <= 50 ms at 300 payments/s", 50.0, False),
    ("fairness_b_p99_ms", "another merchant's p99 < 1 s beside 4 hanging endpoints", 1000.0,
     False),
)


def _get(data: Json, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _best(per_driver: Json | None, key: str) -> float | None:
    if not per_driver:
        return None
    values = [v[key] for v in per_driver.values() if isinstance(v, dict) and key in v]
    return max(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def build(meta: Json, results: Json, usage: Json, config: Json, notes: list[str]) -> Json:
    pgb = results.get("pgbench") or {}
    pgbench_tps = (pgb.get("same_txn") or {}).get("tps")
    drain = _best(results.get("pgqueuer_drain"), "jobs_per_s")
    throughput = _best(results.get("pgqueuer_throughput"), "jobs_per_s")
    api = results.get("api") or {}
    out: Json = {
        "machine": meta["machine"],
        "date": meta["date"],
        "commit": meta["commit"],
        "api": {
            "payments_per_s": api.get("payments_per_s"),
            "p50_ms": api.get("p50_ms"),
            "p99_ms": api.get("p99_ms"),
            "pgbench_same_txn_tps": pgbench_tps,
            # The ledger part alone (no authentication, no idempotency key): for reference.
            "pgbench_ledger_only_tps": (pgb.get("ledger_only") or {}).get("tps"),
        },
        "relay": {
            "handler_events_per_s": _get(results, "handler", "events_per_s"),
            "webhook_deliveries_per_s": _get(results, "webhooks", "deliveries_per_s"),
            "e2e_p50_ms": _get(results, "e2e", "p50_ms"),
            "e2e_p99_ms": _get(results, "e2e", "p99_ms"),
            "fairness_b_p99_ms": _get(results, "fairness", "b_p99_ms"),
        },
        "peer": {
            "pgqueuer_drain_jobs_per_s": drain,
            "pgqueuer_throughput_jobs_per_s": throughput,
        },
    }
    fairness = results.get("fairness")
    if fairness:
        out["fairness"] = {
            "relays": fairness["relays"],
            "b_p50_ms": fairness["b_p50_ms"],
            "b_p99_ms": fairness["b_p99_ms"],
            "b_max_ms": fairness["b_max_ms"],
            "a_first_attempts_within_s": fairness["a_first_attempts_within_s"],
            "a_retry_late_p99_s": fairness["a_retry_late_p99_s"],
        }
    wakeup = results.get("wakeup")
    if wakeup:
        out["wakeup"] = {
            "api_payments_per_s_on": _get(wakeup, "on", "api_payments_per_s"),
            "api_payments_per_s_off": _get(wakeup, "off", "api_payments_per_s"),
            "pgbench_tps_on": _get(wakeup, "on", "pgbench_tps"),
            "pgbench_tps_off": _get(wakeup, "off", "pgbench_tps"),
        }
    ratios = {
        "api_vs_pgbench": _ratio(api.get("payments_per_s"), pgbench_tps),
        "handler_vs_pgqueuer_drain": _ratio(out["relay"]["handler_events_per_s"], drain),
        "webhooks_vs_pgqueuer_throughput": _ratio(out["relay"]["webhook_deliveries_per_s"],
                                                  throughput),
        "e2e_p99_ms": out["relay"]["e2e_p99_ms"],
        "fairness_b_p99_ms": out["relay"]["fairness_b_p99_ms"],
    }
    out["targets"] = {}
    for key, text, threshold, higher in TARGETS:
        value = ratios[key]
        held = None if value is None or (isinstance(value, float) and math.isnan(value)) else (
            value >= threshold if higher else value <= threshold)
        out["targets"][key] = {"target": text, "value": value, "threshold": threshold,
                               "holds": held}
    out["details"] = results
    out["usage"] = usage
    out["config"] = config
    out["notes"] = notes
    return out


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(doc: Json) -> str:
    api, relay, peer = doc["api"], doc["relay"], doc["peer"]
    d = doc["details"]
    lines = [
        f"Run of {doc['date']} at commit `{doc['commit']}`.",
        "",
        "| Figure | Ours | Baseline | Ratio | Target | Holds |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    t = doc["targets"]

    def holds(key: str) -> str:
        h = t[key]["holds"]
        return "n/a" if h is None else ("yes" if h else "**no**")

    lines.append(
        f"| API payments/s (p50 / p99 ms) | {_fmt(api['payments_per_s'])} "
        f"({_fmt(api['p50_ms'], 1)} / {_fmt(api['p99_ms'], 1)}) | "
        f"pgbench same txn {_fmt(api['pgbench_same_txn_tps'])} tps | "
        f"{_fmt(t['api_vs_pgbench']['value'], 2)} | >= 0.5 | {holds('api_vs_pgbench')} |")
    lines.append(
        f"| Handler consumer events/s (drain) | {_fmt(relay['handler_events_per_s'])} | "
        f"pgqueuer drain {_fmt(peer['pgqueuer_drain_jobs_per_s'])} jobs/s | "
        f"{_fmt(t['handler_vs_pgqueuer_drain']['value'], 2)} | >= 2 | "
        f"{holds('handler_vs_pgqueuer_drain')} |")
    lines.append(
        f"| Webhook deliveries/s (drain) | {_fmt(relay['webhook_deliveries_per_s'])} | "
        f"pgqueuer throughput {_fmt(peer['pgqueuer_throughput_jobs_per_s'])} jobs/s | "
        f"{_fmt(t['webhooks_vs_pgqueuer_throughput']['value'], 2)} | >= 1 | "
        f"{holds('webhooks_vs_pgqueuer_throughput')} |")
    lines.append(
        f"| End-to-end p50 / p99 ms at 300/s | {_fmt(relay['e2e_p50_ms'], 1)} / "
        f"{_fmt(relay['e2e_p99_ms'], 1)} | | | p99 <= 50 | {holds('e2e_p99_ms')} |")
    f = doc.get("fairness")
    if f:
        lines.append(
            f"| Fairness: another merchant's p50 / p99 ms beside 4 hanging endpoints "
            f"({f['relays']} relay(s)) | {_fmt(f['b_p50_ms'], 1)} / {_fmt(f['b_p99_ms'], 1)} | "
            f"hanging endpoints: first attempts within {_fmt(f['a_first_attempts_within_s'], 1)}"
            f" s, retries late p99 {_fmt(f['a_retry_late_p99_s'], 2)} s | | p99 < 1000 | "
            f"{holds('fairness_b_p99_ms')} |")
    w = doc.get("wakeup")
    if w:
        lines.append(
            f"| Wake-up on / off: API payments/s | {_fmt(w['api_payments_per_s_on'])} / "
            f"{_fmt(w['api_payments_per_s_off'])} | pgbench {_fmt(w['pgbench_tps_on'])} / "
            f"{_fmt(w['pgbench_tps_off'])} tps | "
            f"{_fmt(_ratio(w['api_payments_per_s_on'], w['api_payments_per_s_off']), 2)} | | |")
    lines.append("")
    extra = []
    pgb = d.get("pgbench") or {}
    for shape, v in pgb.items():
        extra.append(f"pgbench {shape}: {_fmt(v['tps'])} tps, p50 {_fmt(v['p50_ms'], 1)} ms, "
                     f"p99 {_fmt(v['p99_ms'], 1)} ms; API / pgbench {shape} = "
                     f"{_fmt(_ratio(api['payments_per_s'], v['tps']), 2)}")
    for phase in ("pgqueuer_drain", "pgqueuer_throughput"):
        for driver, v in (d.get(phase) or {}).items():
            extra.append(f"{phase.replace('_', ' ')} ({driver}): {_fmt(v['jobs_per_s'])} jobs/s")
    e2e = d.get("e2e")
    if e2e:
        extra.append(
            f"e2e measured from the API's answer instead of the transaction's start: p50 "
            f"{_fmt(e2e['from_api_answer_p50_ms'], 1)} ms, p99 "
            f"{_fmt(e2e['from_api_answer_p99_ms'], 1)} ms; {e2e['delivered']}/{e2e['payments']} "
            f"delivered")
    lines += [f"- {x}" for x in extra]
    if doc.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"
