"""The compile report as a table (levels before and after the depth passes, rotations, CKKS
parameters, both deployment modes). Needs only the report dict stored with a plan, so a server
prints it without importing the compiler."""

from __future__ import annotations


def format_report(report: dict) -> str:
    rows = report["layers"]
    lines = [f"{'layer':<14}{'op':<28}{'levels before':>14}{'levels after':>13}{'rotations':>10}  lowered as"]
    for r in rows:
        lines.append(f"{r['layer']:<14}{r['op'][:27]:<28}{r['levels_before']:>14}{r['levels_after']:>13}"
                     f"{r['rotations']:>10}  {r['lowered_as']}")
    p = report["params"]
    lines.append(f"{'total':<42}{report['levels_before']:>14}{report['levels_after']:>13}{report['rotations']:>10}")
    lines.append(f"{report['levels_after']} multiplications in {report['rescales']} rescales: each square shares "
                 "one prime with the layer after it")
    lines.append(f"CKKS: N={p['poly_modulus_degree']}, primes {p['coeff_modulus_bits']} "
                 f"({sum(p['coeff_modulus_bits'])} bits), scale 2^{p['log_scale_bits']} "
                 f"(inputs 2^{p.get('log_input_scale_bits') or p['log_scale_bits']}), "
                 f"{report['levels_available']} rescales, "
                 + ("128-bit security" if report["security_bits"] >= 128 else "INSECURE (tests only)")
                 + f"; {report['rotation_keys']} rotation keys")
    if report.get("rotation_steps", report["rotation_keys"]) > report["rotation_keys"]:
        lines.append(f"Galois key budget: {report['rotation_keys']} keys for {report['rotation_steps']} rotation steps; "
                     f"rotations per image {report['rotations_one_key_per_step']} -> {report['rotations']} "
                     f"(steps without a key are made of several key rotations; key switching "
                     f"+{report.get('key_switching_growth', 0.0):.0%} by level-weighted cost)")
    if report.get("key_budget_note"):
        lines.append(f"Galois keys: {report['key_budget_note']}")
    if report.get("members", 1) > 1:
        lines.append(f"ensemble of {report['members']} models (the table is the first one's): logits averaged, "
                     f"{report['rotations']} rotations per image in all ({report['reused_input_rotations']} "
                     "input rotations shared), one key set")
    if "relinearizations" in report:
        relin = report["relinearizations"]
        lines.append(f"encrypted-model mode: the same levels and primes (each of the {report['weight_operands']} "
                     "weight operands is encrypted at the level and scale where it is consumed); "
                     f"relinearisations per image {relin['plain_weights']} -> {relin['encrypted_model']}")
    return "\n".join(lines)
