"""Headless notebook runs: the stages' progress bars in the runner's log, and an encrypted
kernel connection.

Why: papermill only logs "Executing notebook with kernel: python3", then nothing until the
notebook ends (minutes), because the stages' ``tqdm.auto`` bars become Jupyter widgets inside
the kernel: their updates are widget messages on the kernel's iopub channel, which papermill
neither logs nor saves. And every kernel printed ipykernel's "[IPKernelApp] WARNING | Kernel
is running over TCP without encryption" to the runner's terminal, because nothing provisioned
CurveZMQ keys for the local kernel connection.

`kernel_manager` returns the kernel manager class to hand papermill
(``papermill.execute_notebook(..., kernel_manager_class=kernel_manager(label))``, passed on to
nbclient). Its kernels get a CurveZMQ key pair in their connection file, so the connection is
encrypted (the warning's own remedy; it then does not fire), and its clients show every iopub
message to a `StepProgress`, which turns progress bars (widgets, or text bars on stderr when
ipywidgets is missing) into log lines for the runner: one when a bar has run ``every_s``
seconds since its last line, and one when it completes (if it ran ``min_s`` or was already
shown), e.g. ``sarcastic/tiny 02_distillation: teacher replies: 40% 37/93 [01:02<01:34]``.
"""

from __future__ import annotations

import html
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

_METER = re.compile(r"(?P<n>\d+)(?:/(?P<total>\d+))?\s*\[")  # "37/93 [01:02<01:34, ...]"
_TEXT_BAR = re.compile(r"^(?P<left>.*?\d+%)\|.*?\|\s*(?P<right>\d+(?:/\d+)?\s*\[.*\])\s*$")
_MODEL_REF = "IPY_MODEL_"


def _plain(text: str) -> str:
    """A widget's HTML text as one plain line (tqdm escapes it and pads with U+2007)."""
    text = html.unescape(text or "").replace("\u2007", " ")
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class _Bar:
    first_seen: float
    last_line: float
    shown: bool = False
    done: bool = False


class StepProgress:
    """Progress lines from a kernel's iopub messages (see the module docstring).

    ``emit`` receives each line (default: this module's logger at INFO); ``clock`` is a
    monotonic clock in seconds.
    """

    def __init__(
        self,
        label: str,
        emit: Callable[[str], None] | None = None,
        every_s: float = 15.0,
        min_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label = label
        self.emit = emit or (lambda line: logger.info("%s", line))
        self.every_s = every_s
        self.min_s = min_s
        self.clock = clock
        self._states: dict[str, dict[str, Any]] = {}  # widget model id -> its state
        self._parent: dict[str, str] = {}  # text widget id -> its progress bar's box id
        self._bars: dict[str, _Bar] = {}

    def observe(self, msg: dict[str, Any]) -> None:
        """Look at one iopub message; never raises (a progress line is not worth a run)."""
        try:
            self._observe(msg)
        except Exception as exc:  # noqa: BLE001 - malformed or unexpected messages
            logger.debug("progress: ignored a message (%s)", exc)

    def _observe(self, msg: dict[str, Any]) -> None:
        kind = msg.get("header", {}).get("msg_type") or msg.get("msg_type")
        content = msg.get("content") or {}
        if kind == "stream" and content.get("name") == "stderr":
            self._text_bars(content.get("text", ""))
        elif kind in ("comm_open", "comm_msg"):
            data = content.get("data") or {}
            if kind == "comm_msg" and data.get("method") != "update":
                return
            self._widget(content.get("comm_id", ""), data.get("state") or {})

    # -- widget bars (tqdm.notebook: HBox[left HTML, FloatProgress, right HTML]) ---------------
    def _widget(self, model: str, update: dict[str, Any]) -> None:
        if model not in self._states:  # kept: text boxes and the boxes holding them
            if update.get("_model_name") not in ("HTMLModel", "HBoxModel"):
                return
            self._states[model] = {}
        state = self._states[model]
        state.update(update)
        children = update.get("children")
        if state.get("_model_name") == "HBoxModel" and isinstance(children, list):
            parts = [c[len(_MODEL_REF) :] for c in children if isinstance(c, str)]
            if len(parts) == 3:
                self._parent[parts[2]] = model  # tqdm sets the right text last
                state["parts"] = parts
        box = self._parent.get(model)
        if box is not None and "value" in update:
            left, _, right = (self._states.get(part, {}) for part in self._states[box]["parts"])
            self._update(box, _plain(left.get("value", "")), _plain(right.get("value", "")))

    # -- text bars on stderr (tqdm without ipywidgets) -----------------------------------------
    def _text_bars(self, text: str) -> None:
        for segment in re.split(r"[\r\n]", text):
            found = _TEXT_BAR.match(segment.strip())
            if found:
                left, right = _plain(found["left"]), _plain(found["right"])
                self._update("text:" + left.rsplit(":", 1)[0], left, right)

    # -- when to print ----------------------------------------------------------------------------
    def _update(self, key: str, left: str, right: str) -> None:
        meter = _METER.match(right)
        if meter is None:
            return
        now = self.clock()
        bar = self._bars.get(key)
        if bar is None or bar.done:  # a new bar (or a finished one's widget reused)
            bar = self._bars[key] = _Bar(first_seen=now, last_line=now)
        total = meter["total"]
        done = total is not None and int(meter["n"]) >= int(total) > 0
        if done:
            bar.done = True
            if not (bar.shown or now - bar.first_seen >= self.min_s):
                return
        elif now - bar.last_line < self.every_s:
            return
        bar.shown, bar.last_line = True, now
        self.emit(f"{self.label}: {left} {right}".strip())


def kernel_manager(label: str, progress: StepProgress | None = None) -> type:
    """A kernel manager class for papermill / nbclient (``kernel_manager_class=``): encrypted
    kernel connections (when libzmq has CURVE), and the stages' progress bars reported by
    ``progress`` (default: a `StepProgress` labelled ``label`` that logs)."""
    import zmq
    from jupyter_client.channels import AsyncZMQSocketChannel
    from jupyter_client.manager import AsyncKernelManager

    watcher = progress or StepProgress(label)

    class WatchedChannel(AsyncZMQSocketChannel):
        async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:
            msg = await super().get_msg(timeout)
            watcher.observe(msg)
            return msg

    class Manager(AsyncKernelManager):
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            if zmq.has("curve"):  # the kernel reads the pair from its connection file
                self.curve_publickey, self.curve_secretkey = zmq.curve_keypair()

        def client(self, **kwargs: Any):
            kc = super().client(**kwargs)
            kc.iopub_channel_class = WatchedChannel
            return kc

    return Manager
