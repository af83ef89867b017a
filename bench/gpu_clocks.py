"""The card's SM clock and power draw while a timed stretch runs (NVML, sampled in a thread), for
the benches' rows: a rate against the datasheet's peak also depends on the clock it ran at.

The datasheet's dense bf16 rate of an H100 / H200 SXM (989 TFLOP/s) is 132 SMs x 4,096 FLOP a
clock at 1,830 MHz. Under a long run of large products the card holds its power cap (700 W) and
lowers the clock below that: `Clocks.summary` says how far (mean SM clock, power, the share of
samples with the power cap holding the clock down) and what 989 becomes at that clock.

    with Clocks() as clocks:
        ...                       # the timed steps
    row.update(clocks.summary())
"""
from __future__ import annotations

import os
import threading

#: the H100 / H200 SXM's dense bf16 rate (datasheet; the benches' denominator), and the SM clock
#: (MHz) it holds at
BF16_PEAK, DATASHEET_MHZ = 989e12, 1830
#: NVML's clock-event reason: the software power cap holds the clock down
SW_POWER_CAP = 0x4


def _handle():
    """This process's first CUDA device in NVML's numbering (None without NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML here: no clock figures
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    try:
        if visible.startswith("GPU-"):
            return pynvml.nvmlDeviceGetHandleByUUID(visible)
        return pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
    except Exception:  # noqa: BLE001
        return None


class Clocks:
    """Samples the SM clock, the power draw and the power-cap reason every `period` seconds
    while open."""

    def __init__(self, period: float = 0.05):
        self.period = period
        self.samples: list[tuple[int, float, bool]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = _handle()

    def _run(self) -> None:
        import pynvml

        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        while not self._stop.wait(self.period):
            try:
                mhz = pynvml.nvmlDeviceGetClockInfo(self._nvml, pynvml.NVML_CLOCK_SM)
                watts = pynvml.nvmlDeviceGetPowerUsage(self._nvml) / 1000.0
                capped = bool(reasons(self._nvml) & SW_POWER_CAP)
            except Exception:  # noqa: BLE001 - a failed read is a missing sample
                continue
            self.samples.append((mhz, watts, capped))

    def __enter__(self) -> "Clocks":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="bench-clocks")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, float]:
        """{} without samples; else the mean SM clock (MHz) and its range, the mean power (W), the
        share of samples capped by power, and 989 TFLOP/s scaled to the mean clock."""
        if not self.samples:
            return {}
        mhz = [s[0] for s in self.samples]
        mean = sum(mhz) / len(mhz)
        return {"sm_mhz": round(mean), "sm_mhz_range": [min(mhz), max(mhz)],
                "power_w": round(sum(s[1] for s in self.samples) / len(self.samples)),
                "power_capped": round(sum(s[2] for s in self.samples) / len(self.samples), 2),
                "bf16_peak_at_clock_tflops": round(BF16_PEAK / 1e12 * mean / DATASHEET_MHZ, 1)}
