"""The text of ``PermutationSpec.report()``: presentation only, apart from the spec's data and logic.

A leaf module: it reads a spec through its public attributes and imports nothing of permgraph.
"""

from __future__ import annotations

EXPECTED_FROZEN = {
    "model input", "model output", "convolution kernel positions", "spatial positions after a convolution",
    "spatial positions after pooling/resampling", "not used by the traced forward pass",
    # recurrent layers (see _rules.recurrent)
    "gate blocks of a recurrent layer play different roles", "a recurrent layer runs over time steps in order",
    "layers and directions of a stacked recurrent state",
}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def coverage_report(spec, max_groups: int = 60) -> str:
    """A readable coverage report of a PermutationSpec: permutable vs frozen parameters, groups, frozen
    parts (by nature, or for lack of understanding, with their locations)."""
    perm, total = spec.permutable_values()
    perm_keys = set(spec.permutable_keys())
    lines = []
    title = spec.info.get("model", "model")
    lines.append(f"permgraph coverage report: {title}")
    lines.append(f"  state-dict tensors: {len(spec.shapes)}  ({total:,} values)")
    lines.append(f"  permutable tensors: {len(perm_keys)}  ({perm:,} values, "
                 f"{100.0 * perm / max(total, 1):.1f}%)")
    lines.append(f"  groups: {len(spec.groups)}  (units: {sum(g.size for g in spec.groups.values()):,})")
    ver = spec.info.get("verification")
    if ver:
        lines.append(f"  verification: {ver.get('status')}  (max relative output change "
                     f"{ver.get('rel_error', float('nan')):.2e}, dtype {ver.get('dtype')})")
    lines.append("")
    lines.append("groups:")
    nested = spec.nested()
    for i, grp in enumerate(spec.groups.values()):
        if i >= max_groups:
            lines.append(f"  ... {len(spec.groups) - max_groups} more groups")
            break
        mods = grp.modules
        shown = ", ".join(mods[:4]) + (f", +{len(mods) - 4} more" if len(mods) > 4 else "")
        structured = sum(1 for m in grp.members if not m.plain)
        extra = f", {structured} structured (flatten/concat/heads)" if structured else ""
        if grp.blocks is not None:
            extra += f", one permutation per head of {spec.groups[grp.blocks].size}"
        elif grp.id in nested:
            extra += f", heads of {', '.join(nested[grp.id])}"
        lines.append(f"  {grp.id:>5}  size {grp.size:<5} {len(grp.members)} axes{extra}: {shown}")
    unperm = [k for k in spec.shapes if k not in perm_keys and _numel(spec.shapes[k]) > 1]
    lines.append("")
    lines.append(f"not permuted ({len(unperm)} tensors): "
                 + (", ".join(unperm[:12]) + (" ..." if len(unperm) > 12 else "") if unperm else "none"))
    if spec.frozen:
        by_reason: dict[str, list] = {}
        for f in spec.frozen:
            by_reason.setdefault(f.reason, []).append(f)
        expected = {k: v for k, v in by_reason.items() if k in EXPECTED_FROZEN}
        other = {k: v for k, v in by_reason.items() if k not in EXPECTED_FROZEN}
        lines.append("")
        lines.append("frozen parts (units that must stay in place):")
        if expected:
            lines.append("  by nature: " + "; ".join(
                f"{k} ({len(v)})" for k, v in sorted(expected.items())))
        for reason, parts in other.items():
            axes = sorted({str(a) for p in parts for a in p.axes})
            wheres = sorted({p.location for p in parts} - {""})
            lines.append(f"  - {reason}: {len(parts)} part(s), {sum(p.size for p in parts)} units"
                         + (f" at {', '.join(wheres[:3])}" + (" ..." if len(wheres) > 3 else "")
                            if wheres else "")
                         + ("; axes: " + ", ".join(axes[:6]) + (" ..." if len(axes) > 6 else "")
                            if axes else ""))
        if not other:
            lines.append("  nothing frozen for lack of understanding: every hidden unit the model has is "
                         "permutable")
    return "\n".join(lines)
