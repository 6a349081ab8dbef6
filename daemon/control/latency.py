"""The latency budget: how many denoising steps (and whether to stream-batch them) fit.

The controller learns what each configuration costs per frame, online, and predicts the
glass-to-glass p95 latency (capture -> publish) of every candidate:

    stream batch, k steps:  (k - 1) * max(cost + gap, input interval)  +  cost  +  rest
    sequential,   k steps:                                           cost  +  rest

(a stream-batched frame leaves the stream k - 1 engine calls after it entered; "gap" is the
engine thread's time between calls; "rest" is what the
engine does not explain: waiting for the engine, output pacing; measured as the residual of the
observed latency). It chooses the largest step count whose predicted p95 fits the budget and
whose cost sustains the target rate, with hysteresis: it steps up only with ``hysteresis`` of the
budget to spare and after a dwell, and steps down only after a few frames in a row over budget,
so noise does not make it oscillate. Costs of configurations not running now are scaled by how
the device's speed moved since they were measured, so a change of device load moves every
prediction (one load index, from the running configuration's cost against its baseline). Pure
logic over injected figures: no clock, no threads, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from daemon.config import LatencyConfig
from streamv2v.config import SCHEDULE_STEPS

#: z-score of the 95th percentile of a normal distribution.
_Z95 = 1.645


@dataclass(frozen=True, order=True)
class StepChoice:
    """A configuration the controller can choose: steps and stream batching."""

    steps: int
    stream_batch: bool

    def __str__(self) -> str:
        return f"{self.steps} step{'s' * (self.steps != 1)}{' (stream batch)' * self.stream_batch}"


@dataclass
class RunningStats:
    """Exponentially weighted mean and variance of a figure (ms)."""

    alpha: float = 0.25
    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        if self.count == 0:
            self.mean, self.var = value, 0.0
        else:
            delta = value - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.count += 1

    @property
    def p95(self) -> float:
        return self.mean + _Z95 * math.sqrt(self.var)


@dataclass
class _Cost:
    """One configuration's measured cost, and its baseline: the mean cost at load 1.0, fixed
    once measured, so a later change of load shows as the load index, not as a new baseline."""

    stats: RunningStats = field(default_factory=RunningStats)
    base: float | None = None
    #: The latency the model does not explain, while this configuration ran (its own bias).
    rest: RunningStats = field(default_factory=lambda: RunningStats(alpha=0.1))


#: Samples of a configuration before its baseline is fixed.
_BASE_SAMPLES = 3
#: Frames in a row with the predicted p95 over budget before stepping down.
_SLOW_DOWN_FRAMES = 30
#: After a step count goes over budget, no step up into it for this many frames (doubling per
#: failure up to the maximum; forgotten once the count below has held for _SURVIVED_FRAMES).
_FIRST_BLOCK_FRAMES, _MAX_BLOCK_FRAMES, _SURVIVED_FRAMES = 150, 4800, 3000


class LatencyBudget:
    """Chooses the step count; fed the engine's per-frame cost and latency."""

    def __init__(self, config: LatencyConfig, input_fps: float, down_frames: int = 3) -> None:
        self.config = config
        self.input_interval_ms = 1000.0 / input_fps
        self.down_frames = down_frames
        self.costs: dict[tuple[str, StepChoice], _Cost] = {}
        self.rest = RunningStats(alpha=0.1)  # latency not explained by the engine's cost
        self.gap = RunningStats(alpha=0.1)  # engine thread time between calls, besides the call
        self.load = 1.0  # the device's speed now relative to when the baselines were measured
        self._load_alpha = 0.25
        self.output_delay = (0.0, 0.0)  # output pacing: (mean, variance) ms, set by the daemon
        self.current: StepChoice | None = None
        self.cost_class = ""
        self._dwell = 0  # frames since the last change
        self._over = 0  # consecutive frames whose own latency was over budget
        self._p95_over = 0  # consecutive frames whose predicted p95 was over budget
        self._last_latency = 0.0
        self._skip = 0  # samples to ignore after a change (allocation, warm-up effects)
        self.last_reason = ""
        self.calibrating = config.calibrate  #: still measuring every candidate once
        self._calibrated: set[tuple[str, StepChoice]] = set()
        self._frame = 0
        self._blocked_until: dict[int, int] = {}  # steps -> frame before which no step up
        self._backoff: dict[int, int] = {}  # steps -> the next block's length (frames)

    # ------------------------------------------------------------------ measurements
    def observe(
        self,
        choice: StepChoice,
        cost_ms: float,
        latency_ms: float | None = None,
        interval_ms: float | None = None,
    ) -> None:
        """One engine frame of ``choice``: its cost, the latency from the output frame's capture
        to now (engine side; None when the call output nothing), and the time since the
        previous call started (the engine thread's own overhead between calls is part of the
        stream-batch lag)."""
        if interval_ms is not None and interval_ms < 1000:  # not across a pause or a reload
            self.gap.add(max(0.0, interval_ms - cost_ms))
        if self._skip > 0:
            self._skip -= 1
            return
        entry = self.costs.setdefault((self.cost_class, choice), _Cost())
        entry.stats.add(cost_ms)
        if entry.base is None and entry.stats.count >= _BASE_SAMPLES:
            entry.base = entry.stats.mean / self.load
        if entry.base is not None:  # the load index: the device's speed against the baselines
            self.load += self._load_alpha * (cost_ms / entry.base - self.load)
        if latency_ms is not None:
            rest = max(0.0, latency_ms - self._engine_part(choice, cost_ms))
            self.rest.add(rest)
            entry.rest.add(rest)
        # This frame's own latency, for the fast over-budget check (a spike is one frame).
        self._last_latency = self._engine_part(choice, cost_ms) + self._rest_of(choice).mean
        self._last_latency += self.output_delay[0]

    def _rest_of(self, choice: StepChoice) -> RunningStats:
        """The unexplained latency of ``choice``: its own once it has run, else the global one."""
        entry = self.costs.get((self.cost_class, choice))
        if entry is not None and entry.rest.count:
            return entry.rest
        return self.rest

    def _engine_part(self, choice: StepChoice, cost_ms: float) -> float:
        return self._lag(choice, cost_ms) + cost_ms

    def _lag(self, choice: StepChoice, cost_ms: float) -> float:
        """How long a stream-batched frame waits for the k - 1 calls after its own."""
        if not choice.stream_batch:
            return 0.0
        return (choice.steps - 1) * max(cost_ms + self.gap.mean, self.input_interval_ms)

    def expected_cost(self, choice: StepChoice) -> tuple[float, float] | None:
        """(mean, p95) cost of ``choice`` now; None when nothing is known to estimate it from."""
        entry = self.costs.get((self.cost_class, choice))
        if entry is not None:
            live = entry.stats
            if live.count and (choice == self.current or entry.base is None):
                return live.mean, live.p95
            if entry.base is not None:  # measured before: its baseline at today's load,
                mean = entry.base * self.load  # with the running configuration's jitter
                return mean, mean * self._spread()
        # Never measured: extrapolate linearly in steps from the nearest measured count of the
        # same mode (conservative: batched steps cost less than that on a GPU).
        measured = [c for (cls, c), e in self.costs.items() if cls == self.cost_class]
        measured = [c for c in measured if c != choice]
        if not measured:
            return None
        near = min(
            measured,
            key=lambda c: (c.stream_batch != choice.stream_batch, abs(c.steps - choice.steps)),
        )
        known = self.expected_cost(near)
        if known is None:
            return None
        ratio = choice.steps / near.steps
        return known[0] * ratio, known[1] * ratio

    def _spread(self) -> float:
        """p95 / mean of the running configuration's cost: the device's jitter now."""
        entry = self.costs.get((self.cost_class, self.current)) if self.current else None
        if entry is None or entry.stats.count < _BASE_SAMPLES:
            return 1.1
        return entry.stats.p95 / max(entry.stats.mean, 1e-9)

    def predict_p95(self, choice: StepChoice) -> float | None:
        """Predicted glass-to-glass p95 (ms) of ``choice``: the means of its parts plus the
        95% spread of their sum (independent parts: the variances add, not the p95s)."""
        cost = self.expected_cost(choice)
        if cost is None:
            return None
        mean, p95 = cost
        cost_var = ((p95 - mean) / _Z95) ** 2
        lag, lag_var = self._lag(choice, mean), 0.0
        if choice.stream_batch and mean + self.gap.mean > self.input_interval_ms:
            lag_var = (choice.steps - 1) * cost_var  # k - 1 engine calls, each jittering
        delay_mean, delay_var = self.output_delay
        rest = self._rest_of(choice)
        spread = math.sqrt(cost_var + lag_var + rest.var + delay_var)
        return lag + mean + rest.mean + delay_mean + _Z95 * spread

    # ------------------------------------------------------------------ decisions
    def candidates(self, lo: int, hi: int) -> list[StepChoice]:
        modes = {"auto": (True, False), "always": (True,), "never": (False,)}
        lo, hi = max(lo, self.config.min_steps), min(hi, self.config.max_steps)
        lo, hi = (lo, hi) if lo <= hi else (hi, hi)  # disjoint ranges: the preset's bound wins
        out = []
        for k in range(lo, hi + 1):
            batch = modes[self.config.stream_batch]
            out += [StepChoice(k, b) for b in (batch[:1] if k == 1 else batch)]
        return out

    def fits(self, choice: StepChoice, margin: float = 1.0) -> bool:
        """Predicted to meet the budget and the rate with ``margin`` of them used at most."""
        cfg = self.config
        predicted, cost = self.predict_p95(choice), self.expected_cost(choice)
        if predicted is None or cost is None:
            return False
        if cfg.budget_ms is not None and predicted > cfg.budget_ms * margin:
            return False
        return cfg.target_fps is None or cost[0] <= 1000.0 / cfg.target_fps * margin

    def decide(self, current: StepChoice, lo: int, hi: int, cost_class: str = "") -> StepChoice:
        """The configuration to run next (``current`` when nothing should change); call once
        per engine frame with the step range the active preset allows."""
        self.current, self.cost_class = current, cost_class
        self._dwell += 1
        self._frame += 1
        if self._dwell == _SURVIVED_FRAMES:  # it held: probing above it may be quick again
            for steps in [k for k in self._backoff if k > current.steps]:
                del self._backoff[steps]
        options = self.candidates(lo, hi)
        if current not in options:  # the range moved (another preset): nearest allowed
            return self._change(min(options, key=lambda c: abs(c.steps - current.steps)), "range")
        need = self.config.calibration_frames
        self.calibrating = False
        if self.config.calibrate:
            for choice in options:
                entry = self.costs.get((cost_class, choice))
                if entry is not None and entry.stats.count >= need:
                    self._calibrated.add((cost_class, choice))
                if (cost_class, choice) not in self._calibrated:
                    self.calibrating = True
                    if choice != current:
                        return self._change(choice, "calibrating")
                    return current
        fitting = [c for c in options if self.fits(c)]
        # Nothing fits: the fewest steps, in the mode predicted faster.
        best = max(fitting, key=self._rank) if fitting else min(options, key=self._fewest)
        # Over budget: this frame's own latency for `down_frames` frames in a row (a jump in
        # cost, seen within a few frames; one spike is not enough), or the predicted p95 for a
        # while (noise that puts the p95 over the budget while most frames fit).
        budget = self.config.budget_ms
        frame_over = budget is not None and self._last_latency > budget
        self._over = self._over + 1 if frame_over else 0
        self._p95_over = 0 if self.fits(current) else self._p95_over + 1
        over = self._over >= self.down_frames or self._p95_over >= _SLOW_DOWN_FRAMES
        if over and best != current and best.steps <= current.steps:
            self._block(current.steps)
            return self._change(best, "over budget")
        if not self.fits(current):
            return current
        # Up one step count at a time, with budget to spare, after a dwell, and not into a
        # count that just failed (its block doubles with each failure: probing, not flapping).
        up = [
            c
            for c in fitting
            if c.steps > current.steps
            and self.fits(c, 1 - self.hyst)
            and self._blocked_until.get(c.steps, 0) <= self._frame
        ]
        if up and self._dwell >= self._min_dwell(current):
            step = min(c.steps for c in up)
            target = max((c for c in up if c.steps == step), key=self._rank)
            return self._change(target, "budget to spare")
        # Same steps, the other mode predicted clearly better: switch without changing quality.
        if (
            best.steps == current.steps
            and best != current
            and self.fits(best, 1 - self.hyst)
            and self._dwell >= self._min_dwell(current)
        ):
            return self._change(best, "same steps, lower latency")
        return current

    @property
    def hyst(self) -> float:
        return self.config.hysteresis

    def _rank(self, choice: StepChoice) -> tuple[int, float]:
        """More steps first; then the lower predicted latency."""
        predicted = self.predict_p95(choice)
        return choice.steps, -(predicted if predicted is not None else math.inf)

    def _fewest(self, choice: StepChoice) -> tuple[int, float]:
        predicted = self.predict_p95(choice)
        return choice.steps, (predicted if predicted is not None else math.inf)

    def _block(self, steps: int) -> None:
        """``steps`` (and more) went over budget: no step up into them for a while."""
        wait = self._backoff.get(steps, _FIRST_BLOCK_FRAMES)
        for k in range(steps, steps + SCHEDULE_STEPS):
            self._blocked_until[k] = max(self._blocked_until.get(k, 0), self._frame + wait)
        self._backoff[steps] = min(wait * 2, _MAX_BLOCK_FRAMES)

    def _min_dwell(self, current: StepChoice) -> int:
        # Enough frames for the new configuration's warm-up and a fair measurement.
        return 2 * current.steps + 10

    def _change(self, choice: StepChoice, reason: str) -> StepChoice:
        self._dwell, self._over, self._p95_over, self._skip = 0, 0, 0, 1
        self.last_reason = reason
        entry = self.costs.get((self.cost_class, choice))
        if entry is not None and entry.base is not None:
            # Its live figures are from its last run; until new samples come in, its baseline
            # at today's load stands for it.
            entry.stats = RunningStats()
        return choice
