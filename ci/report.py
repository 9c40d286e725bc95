"""The gate's results: which detector caught a failure, and JSON / JUnit XML for CI systems."""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

DETECTORS = {  # exception type name -> the detector that raised it
    "Divergence": "differential",
    "InvariantViolation": "invariants",
    "SyncViolation": "sync_guard (sync)",
    "BufferRace": "sync_guard (race)",
    "EngineHang": "watchdog (step bound)",
    "CheckHang": "watchdog",
    "FaultContractError": "fault containment",
}


def classify(exc: BaseException) -> tuple[str, str, str, str | None]:
    """(detail, detector, message, replay path) of a check's failure."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    message = "\n".join([str(exc), *getattr(exc, "__notes__", ())]).strip()
    # a PropertyFailure's message starts with the type of what it wraps
    kind = message.split(":", 1)[0] if type(exc).__name__ == "PropertyFailure" else None
    names = [kind, *(type(e).__name__ for e in chain)]
    detector = next((DETECTORS[n] for n in names if n in DETECTORS), None)
    if detector == "invariants" and "no overlap" in message:
        detector = "overlap check"
    if detector is None:
        detector = f"crash ({type(chain[-1]).__name__})"
    replay = getattr(exc, "replay", None)
    first = message.splitlines()[0] if message else type(exc).__name__
    return first[:160], detector, message, None if replay is None else str(replay)


@dataclass
class CheckResult:
    name: str
    status: str   # "pass", "fail", "n/a" (it does not apply to the engine), "skipped" (not run)
    seconds: float
    detail: str
    detector: str | None = None
    message: str | None = None
    replay: str | None = None
    hung: bool = False     # the watchdog stopped it: engine threads may still be running

    def line(self) -> str:
        what = f"caught by {self.detector}" if self.status == "fail" else self.detail
        return f"  {self.status.upper():4}  {self.name:<15} {self.seconds:6.1f}s  {what}"

    def report_lines(self, limit: int) -> list[str]:
        """The failure's first lines (no engine tracebacks) and its replay command."""
        if self.status == "pass":
            return []
        lines = [line for line in (self.message or "").splitlines() if line.strip()]
        shown = [line for line in lines if "lockstep replay" not in line][:limit]
        if len(lines) > len(shown) + (1 if self.replay else 0):
            shown.append("...")
        if self.replay:
            shown.append(f"replay: lockstep replay {self.replay}")
        return shown


@dataclass
class GateResult:
    model: str
    device: str
    quick: bool
    checks: list[CheckResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @property
    def passed(self) -> bool:
        ran = [c for c in self.checks if c.status not in ("n/a", "skipped")]
        return bool(ran) and all(c.status == "pass" for c in ran)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.checks)

    def to_dict(self) -> dict:
        from lockstep import __version__
        return {"tool": "lockstep gate", "version": __version__, "model": self.model,
                "device": self.device, "quick": self.quick, "passed": self.passed,
                "exit_code": 0 if self.passed else 1, "seconds": round(self.seconds, 3),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "checks": [asdict(c) for c in self.checks]}

    def write_json(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def write_junit(self, path: str) -> None:
        """One <testsuite> of one <testcase> per check, as CI systems read JUnit XML."""
        failures = sum(c.status == "fail" for c in self.checks)
        skipped = sum(c.status in ("n/a", "skipped") for c in self.checks)
        suite = ET.Element("testsuite", name="lockstep gate", tests=str(len(self.checks)),
                           failures=str(failures), errors="0", skipped=str(skipped),
                           time=f"{self.seconds:.3f}",
                           timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started)))
        props = ET.SubElement(suite, "properties")
        for key, value in (("model", self.model), ("device", self.device),
                           ("quick", str(self.quick).lower())):
            ET.SubElement(props, "property", name=key, value=value)
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname="lockstep.gate", name=c.name,
                                 time=f"{c.seconds:.3f}")
            if c.status == "fail":
                failure = ET.SubElement(case, "failure", type=c.detector or "failure",
                                        message=c.detail)
                failure.text = "\n".join(c.report_lines(40))
            elif c.status in ("n/a", "skipped"):
                ET.SubElement(case, "skipped", message=c.detail)
            else:
                ET.SubElement(case, "system-out").text = c.detail
        tree = ET.ElementTree(ET.Element("testsuites"))
        tree.getroot().append(suite)
        ET.indent(tree)
        tree.write(path, encoding="utf-8", xml_declaration=True)
