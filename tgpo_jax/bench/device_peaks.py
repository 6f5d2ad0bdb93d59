"""Vendor peak memory bandwidth of known accelerators, looked up from a device's `device_kind`, for
the roofline fractions the benchmarks report (`bench sampler`, `bench rollout`). No JAX import.

Figures are the vendors' data-sheet numbers (GB/s = 1e9 bytes/s). An unknown kind gives None: the
benchmark then reports no fraction unless `--hbm-gbps` names the peak, rather than guess one.
"""

from __future__ import annotations

# (substring of device_kind, lower-cased; GB/s); the first match wins, so the most specific come
# first: "gh200" before "h200" (part of its name), "h100 pcie" before "h100", "tpu v5 lite" before
# "tpu v5".
HBM_GBPS: tuple[tuple[str, float], ...] = (
    ("gh200", 4000.0),  # GH200: 4.0 TB/s HBM3
    ("h200", 4800.0),  # H200 SXM / NVL: 4.8 TB/s HBM3e
    ("h100 pcie", 2000.0),  # H100 PCIe: 2.0 TB/s HBM2e
    ("h100 nvl", 3900.0),  # H100 NVL: 3.9 TB/s
    ("h100", 3350.0),  # H100 SXM ("NVIDIA H100 80GB HBM3"): 3.35 TB/s
    ("a100-sxm4-80gb", 2039.0),
    ("a100", 1555.0),  # A100 40 GB
    ("tpu v6 lite", 1640.0),  # v6e (Trillium)
    ("tpu v5 lite", 819.0),  # v5e
    ("tpu v5", 2765.0),  # v5p ("TPU v5", "TPU v5p")
    ("tpu v4", 1228.0),
)


def hbm_gbps(device_kind: str, platform: str = "") -> float | None:
    """The peak HBM bandwidth of `device_kind` in GB/s, or None (CPU, or a kind not in HBM_GBPS)."""
    kind = device_kind.lower()
    if platform == "cpu" or kind == "cpu":
        return None
    return next((gbps for key, gbps in HBM_GBPS if key in kind), None)
