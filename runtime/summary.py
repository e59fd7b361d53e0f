"""What a run of ``python -m runtime.run`` reports: its exit codes, the live status line and the summary.

:class:`RunSummary` counts every frame's outcome and turns the run into one exit code a supervisor can act on
(``EXIT_*`` below, the one home for them); :class:`StatusLine` redraws one line on stderr while frames go by.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from runtime.contract import INVALID_LABEL
from runtime.outputs import FrameResult

# Exit codes: the one home for them (the --help epilog of runtime.run and RunSummary.exit_code use these).
EXIT_OK = 0  # every input was classified, or was an invalid frame the quality gate refused (also after a clean stop)
EXIT_INTERNAL = 1  # an unexpected internal error (traceback printed); Python's own code for an uncaught exception
EXIT_USAGE = 2  # nothing ran: bad arguments, source or model not found or not loadable, self-check failed
EXIT_INPUT = 3  # some inputs could not be read or classified (error records written, the rest processed)
EXIT_OUTPUT = 4  # an output could not be opened or written (disk full, permission, broken pipe); the file is named
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "every input classified (or refused as invalid by the frame-quality gate); also after Ctrl-C/SIGTERM",
    EXIT_INTERNAL: "internal error (a traceback is printed)",
    EXIT_USAGE: "nothing ran: bad arguments, source or model not found or not loadable, self-check failed",
    EXIT_INPUT: "some inputs could not be read or classified (error records written, the rest processed), or "
                "the source failed or gave no frames",
    EXIT_OUTPUT: "an output could not be opened or written (disk full, permission, broken pipe; the file is "
                 "named); the run stops there unless --on-output-error continue",
    EXIT_INTERRUPTED: "interrupted by a second Ctrl-C",
}



class StatusLine:
    """One status line on stderr: redrawn in place on a terminal, a plain line every ``log_every`` s otherwise."""

    def __init__(self, stream: TextIO, enabled: bool = True, log_every: float = 10.0) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.log_every = log_every
        self._last = 0.0
        self._shown = False

    def clear(self) -> None:
        """Wipe the line so a log line can take its place (it is redrawn by the next update)."""
        self._end("\r\x1b[K")

    def _end(self, text: str) -> None:
        if self.tty and self._shown:
            self.stream.write(text)
            self.stream.flush()
            self._shown = False

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if force or not self._shown or now - self._last >= 0.2:
                self.stream.write("\r\x1b[K" + text)
                self.stream.flush()
                self._last, self._shown = now, True
        elif now - self._last >= self.log_every:  # logs/pipes: a line per interval, never one per frame
            if self._last:
                self.stream.write(text + "\n")
                self.stream.flush()
            self._last = now

    def finish(self) -> None:
        """Leave the last status on its own line (the summary follows)."""
        self._end("\n")


def is_invalid(pred: Any) -> bool:
    """A frame the frame-quality gate refused: its own outcome, neither a class nor ``other``."""
    return pred.label == INVALID_LABEL


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class RunSummary:
    source: str
    model: str = ""
    frames: int = 0
    classified: int = 0  # got a class (or other); invalid frames and errors are counted apart
    errors: int = 0  # could not be read or classified
    rejected: int = 0  # classified, then rejected to other
    dropped: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    labels: Counter[str] = field(default_factory=Counter)  # classified frames by final label
    invalid_reasons: Counter[str] = field(default_factory=Counter)  # invalid frames by reason
    stopped_by: str = "end"  # end | signal | max-frames | window | source-error | output-error | internal-error
    source_error: str | None = None
    internal_error: str | None = None
    outputs: list[str] = field(default_factory=list)
    output_errors: list[str] = field(default_factory=list)  # one message per failed output, naming it
    error_examples: list[str] = field(default_factory=list, repr=False)  # the first few frame errors
    streams: list[dict[str, Any]] = field(default_factory=list)  # one entry per source (SourceFeed.to_dict)
    batches: int = 0  # inference calls; frames / batches is the mean batch across sources

    MAX_EXAMPLES = 5

    @property
    def invalid(self) -> int:
        return sum(self.invalid_reasons.values())

    def invalid_text(self) -> str:
        """``blank 2, noise 1``: invalid frames per reason, most frequent first."""
        return ", ".join(f"{k} {v}" for k, v in self.invalid_reasons.most_common())

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def latency_mean_ms(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else math.nan

    @property
    def latency_p90_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 90)) if self.latencies_ms else math.nan

    def add(self, result: FrameResult) -> None:
        """Count one frame's outcome."""
        self.frames += 1
        p = result.prediction
        if p is None:
            self.errors += 1
            if len(self.error_examples) < self.MAX_EXAMPLES:
                self.error_examples.append(result.error or "unknown error")
            return
        self.latencies_ms.append(result.latency_ms)
        if is_invalid(p):
            self.invalid_reasons[p.reason or "unspecified"] += 1
        else:
            self.classified += 1
            self.rejected += bool(p.rejected)
            self.labels[p.label] += 1

    @property
    def exit_code(self) -> int:
        """What a supervisor should read from this run (see ``EXIT_CODES``)."""
        if self.stopped_by == "internal-error":
            return EXIT_INTERNAL
        if self.output_errors:
            return EXIT_OUTPUT
        if self.errors or self.stopped_by == "source-error" or self.source_error or self.frames == 0:
            return EXIT_INPUT
        return EXIT_OK

    def outcome(self) -> str:
        code = self.exit_code
        if code == EXIT_OK:
            why = "every frame classified" + (" or refused as invalid" if self.invalid else "")
        elif code == EXIT_OUTPUT:
            why = _plural(len(self.output_errors), "output") + " failed"
        elif code == EXIT_INPUT:
            why = (_plural(self.errors, "input") + " could not be read or classified" if self.errors
                   else "the source failed" if self.stopped_by == "source-error"
                   else "a source failed" if self.source_error else "no frames could be read")
        else:
            why = "internal error"
        return f"exit {code}: {why}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "frames": self.frames, "classified": self.classified,
                "invalid": self.invalid, "invalid_reasons": dict(self.invalid_reasons.most_common()),
                "errors": self.errors, "rejected": self.rejected, "dropped": self.dropped,
                "reconnects": self.reconnects, "elapsed_s": round(self.elapsed_s, 3), "fps": round(self.fps, 2),
                "latency_mean_ms": _round(self.latency_mean_ms), "latency_p90_ms": _round(self.latency_p90_ms),
                "labels": dict(self.labels.most_common()), "stopped_by": self.stopped_by,
                "source_error": self.source_error, "outputs": self.outputs, "output_errors": self.output_errors,
                "sources": self.streams, "batches": self.batches, "exit_code": self.exit_code}

    def format(self) -> str:
        """The summary printed at the end of a run: counts, speed, labels, problems, outputs, how it ended."""
        labels = ", ".join(f"{k} {v}" for k, v in self.labels.most_common()) or "-"
        counts = f"{self.classified} classified, {_plural(self.errors, 'error')}"
        if self.invalid:
            counts += f", {self.invalid} invalid"
        if self.rejected:
            counts += f", {self.rejected} rejected to other"
        if self.latencies_ms:
            speed = (f"{self.fps:.1f} fps over {self.elapsed_s:.2f} s; latency mean {self.latency_mean_ms:.1f} ms, "
                     f"p90 {self.latency_p90_ms:.1f} ms")
        else:
            speed = f"no frames classified ({self.elapsed_s:.2f} s)"
        return "\n".join([
            "-- summary " + "-" * 50,
            f"source    {self.source}",
            f"model     {self.model}",
            f"frames    {self.frames} ({counts})",
            f"speed     {speed}",
            f"labels    {labels}",
            *self._detail_lines(),
            f"ended     {self._ended_text()}; {self.outcome()}",
        ])

    def _detail_lines(self) -> list[str]:
        """Invalid frames, errors, drops, per-source lines, outputs and failed outputs, where there are any."""
        lines = []
        if self.invalid:
            lines.append(f"invalid   {self.invalid} (no usable content): {self.invalid_text()}")
        if self.errors:
            more = self.errors - len(self.error_examples)
            lines += [f"error     {e}" for e in self.error_examples]
            if more > 0:
                lines.append(f"error     ... and {more} more (see the records)")
        if self.dropped or self.reconnects:
            lines.append(f"live      {self.dropped} frames dropped (classifier busy), {self.reconnects} reconnects")
        if len(self.streams) > 1:
            lines.append(f"batching  {self.frames} frames in {self.batches} inference calls "
                         f"(mean batch {self.frames / max(1, self.batches):.2f})")
            lines += [f"  {_stream_line(st)}" for st in self.streams]
        if self.outputs:
            lines.append(f"outputs   {', '.join(self.outputs)}")
        return lines + [f"FAILED    {e}" for e in self.output_errors]

    def _ended_text(self) -> str:
        return {"end": "end of source" + ("s" if len(self.streams) > 1 else ""), "signal": "stopped by signal",
                "max-frames": "--max-frames reached",
                "window": "window closed", "source-error": f"source failed: {self.source_error}",
                "output-error": ("every output failed" if len(self.output_errors) >= len(self.outputs) else
                                 "an output failed (--on-output-error continue keeps going without it)"),
                "internal-error": f"internal error: {self.internal_error}"}[self.stopped_by]


def _stream_line(st: dict[str, Any]) -> str:
    """One source in the summary: ``cam1 (stream) ended: 120 frames, 25.0 fps, 3 dropped, 1 reconnect``."""
    text = (f"{st['name']} ({st['kind']}) {st['state']}: {_plural(st['frames'], 'frame')}, {st['fps']:.1f} fps, "
            f"{st['dropped']} dropped, {_plural(st['reconnects'], 'reconnect')}")
    if st["errors"]:
        text += f", {_plural(st['errors'], 'error')}"
    if st["invalid"]:
        text += f", {st['invalid']} invalid"
    if st.get("error"):
        text += f"; {st['error']}"
    return text


def _round(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None
