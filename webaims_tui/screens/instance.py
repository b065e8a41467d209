"""One archived instance: its full tag dump (sequences expandable) and an image preview.

The preview decodes only the frame shown, in a worker, and keeps that frame's modality-LUT values
so that window/level changes only redo the cheap 8-bit mapping. It renders through
``textual-image``: Sixel or the kitty protocol where the terminal has them, half-block characters
otherwise (plain SSH, tmux).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Static, Tree
from textual.widgets.tree import TreeNode

from webaims_tui.engine.autoloader import pixel_claim
from webaims_tui.engine.browse import InstanceFile, TagNode
from webaims_tui.screens.base import WebaimsScreen
from webaims_tui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


def _preview_widget_class() -> type[Any]:
    """The best image widget: a graphics protocol if the terminal has one, else half blocks."""
    from textual_image.renderable import Image as Detected
    from textual_image.renderable.sixel import Image as SixelRenderable
    from textual_image.renderable.tgp import Image as TGPRenderable
    from textual_image.widget import HalfcellImage, Image

    if Detected in (SixelRenderable, TGPRenderable):
        return Image
    return HalfcellImage


@dataclass
class Frame:
    """One decoded frame, already through the modality LUT (or RGB, left as it is)."""

    index: int
    count: int
    values: Any  # numpy array
    color: bool
    window: float
    level: float


class FrameTooLarge(Exception):
    """The header says the frame decodes to more than the preview may allocate."""


def decode_frame(path: Path, index: int, max_frame_bytes: int) -> Frame:
    """Decode frame ``index`` only (pydicom reads just that frame from multi-frame data).

    Raises :class:`FrameTooLarge`, decoding nothing, when the header says the frame decodes
    to more than ``max_frame_bytes``: pydicom allocates what the header says, and a file
    archived before the autoloader checked that (or under a larger bound) may claim gigabytes.
    """
    import numpy as np
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut, pixel_array

    header = dcmread(path, stop_before_pixels=True)
    claim = pixel_claim(header)
    if claim is not None and claim.decoded_frame_bytes > max_frame_bytes:
        raise FrameTooLarge(
            f"a frame would decode to {claim.decoded_frame_bytes >> 20} MB "
            f"({claim.rows} x {claim.columns} x {claim.samples} samples x {claim.bits} bits), "
            f"more than autoloader.max_decoded_frame_mb allows ({max_frame_bytes >> 20} MB)"
        )
    count = int(header.get("NumberOfFrames", 1) or 1)
    index = max(0, min(index, count - 1))
    array = pixel_array(path, index=index) if count > 1 else pixel_array(path)
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    color = array.ndim == 3 and array.shape[-1] in (3, 4)
    if color:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            array = convert_color_space(array, photometric, "RGB")
        values = array.astype(np.float32)
        return Frame(index, count, values, True, 256.0, 128.0)
    values = apply_modality_lut(array, header).astype(np.float32)
    if photometric == "MONOCHROME1":
        values = values.max() - values + values.min()
    window, level = _default_window(header, values)
    return Frame(index, count, values, False, window, level)


def _default_window(header: Any, values: Any) -> tuple[float, float]:
    import numpy as np

    try:
        width = header.get("WindowWidth")
        center = header.get("WindowCenter")
        if width is not None and center is not None:
            width = float(
                width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width
            )
            center = float(
                center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center
            )
            if width > 0:
                return width, center
    except (TypeError, ValueError):
        pass
    # No usable window in the file: the 1st-99th percentile range shows most anatomy.
    low, high = np.percentile(values, [1, 99])
    return max(float(high - low), 1.0), float((high + low) / 2)


def windowed_image(frame: Frame) -> PILImage:
    """An 8-bit PIL image of ``frame`` at its window/level."""
    import numpy as np
    from PIL import Image

    if frame.color:
        return Image.fromarray(np.clip(frame.values, 0, 255).astype(np.uint8)[..., :3], "RGB")
    low = frame.level - frame.window / 2
    scaled = (frame.values - low) / frame.window * 255.0
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def _tree_nodes(parent: TreeNode[None], nodes: list[TagNode]) -> None:
    for node in nodes:
        if node.children:
            branch = parent.add(node.label, expand=False)
            _tree_nodes(branch, node.children)
        else:
            parent.add_leaf(node.label)


class InstanceScreen(WebaimsScreen):
    """Pushed on the browser for one instance; Escape returns."""

    TITLE = "Instance"
    HELP = """\
[b]Instance[/b]
Left: every element of the archived file; Enter expands a sequence and its items.
Right: the image. [b]w[/b]/[b]W[/b] narrow/widen the window, [b]l[/b]/[b]L[/b] lower/raise the
level, [b]0[/b] resets them, [b],[/b] and [b].[/b] step through frames, [b]v[/b] hides the preview.
Only the frame shown is decoded."""

    BINDINGS = [
        Binding("escape,backspace", "close", "Back"),
        Binding("comma", "frame(-1)", "Prev frame", show=False),
        Binding("full_stop", "frame(1)", "Next frame", show=False),
        Binding("w", "window(0.8)", "Window -", show=False),
        Binding("W", "window(1.25)", "Window +"),
        Binding("l", "level(-1)", "Level -", show=False),
        Binding("L", "level(1)", "Level +"),
        Binding("0", "reset_window", "Reset W/L", show=False),
        Binding("v", "toggle_preview", "Preview"),
    ]

    def __init__(self, instance_id: int) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.file: InstanceFile | None = None
        self.frame: Frame | None = None
        self._defaults: tuple[float, float] | None = None

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        yield Static("", id="instance-info")
        with Horizontal(id="instance-body"):
            tree: Tree[None] = Tree("elements", id="tags")
            tree.show_root = False
            yield tree
            with Vertical(id="preview-pane"):
                yield Static("decoding…", id="preview-state")
                yield _preview_widget_class()(id="preview")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#tags", Tree).focus()
        self.load_tags()

    @work(thread=True, group="tags", exclusive=True, exit_on_error=False, name="tag dump")
    def load_tags(self) -> None:
        engine = self.webaims.engine
        file = engine.instance_file(self.instance_id)
        nodes = engine.tag_dump(self.instance_id)
        self.app.call_from_thread(self.show_tags, file, nodes)

    def show_tags(self, file: InstanceFile, nodes: list[TagNode]) -> None:
        self.file = file
        info = Text(no_wrap=True, overflow="ellipsis")
        info.append(" path ", style="dim")
        info.append(file.relative_path)
        info.append("  TS ", style="dim")
        info.append(file.transfer_syntax_uid)
        info.append("  rule set ", style="dim")
        info.append("none" if file.ruleset_version is None else f"#{file.ruleset_version}")
        self.query_one("#instance-info", Static).update(info)
        tree = self.query_one("#tags", Tree)
        tree.clear()
        _tree_nodes(tree.root, nodes)
        tree.root.expand()
        tree.move_cursor(tree.root.children[0] if tree.root.children else None)
        self.load_frame(0)

    @work(thread=True, group="preview", exclusive=True, exit_on_error=False, name="preview")
    def load_frame(self, index: int) -> None:
        if self.file is None:
            return
        bound = self.webaims.engine.settings.autoloader.max_decoded_frame_bytes
        try:
            frame = decode_frame(self.file.path, index, bound)
        except Exception as exc:  # too large, compressed data without a decoder, no pixels...
            self.app.call_from_thread(self._preview_failed, str(exc))
            return
        if self.frame is not None and not self.frame.color and not frame.color:
            # Keep the user's window/level while stepping frames.
            frame.window, frame.level = self.frame.window, self.frame.level
        image = windowed_image(frame)
        self.app.call_from_thread(self.show_frame, frame, image)

    def _preview_failed(self, reason: str) -> None:
        self.query_one("#preview-state", Static).update(f"no preview: {reason}")

    def show_frame(self, frame: Frame, image: PILImage) -> None:
        if self._defaults is None:
            self._defaults = (frame.window, frame.level)
        self.frame = frame
        preview: Any = self.query_one("#preview")
        preview.image = image
        self._show_preview_state()

    def _show_preview_state(self) -> None:
        frame = self.frame
        if frame is None:
            return
        parts = [f"frame {frame.index + 1}/{frame.count}"]
        if not frame.color:
            parts.append(f"W {frame.window:.0f} L {frame.level:.0f}")
        self.query_one("#preview-state", Static).update("  ".join(parts))

    @work(thread=True, group="preview", exclusive=True, exit_on_error=False, name="preview")
    def rewindow(self, frame: Frame) -> None:
        image = windowed_image(frame)
        self.app.call_from_thread(self.show_frame, frame, image)

    # --- actions ------------------------------------------------------------------------------

    def action_close(self) -> None:
        self.dismiss(None)

    def action_frame(self, step: int) -> None:
        frame = self.frame
        if frame is None or frame.count <= 1:
            return
        self.load_frame((frame.index + step) % frame.count)

    def action_window(self, factor: float) -> None:
        frame = self.frame
        if frame is None or frame.color:
            return
        frame.window = max(frame.window * factor, 1.0)
        self.rewindow(frame)

    def action_level(self, direction: int) -> None:
        frame = self.frame
        if frame is None or frame.color:
            return
        frame.level += direction * frame.window * 0.1
        self.rewindow(frame)

    def action_reset_window(self) -> None:
        frame = self.frame
        if frame is None or frame.color or self._defaults is None:
            return
        frame.window, frame.level = self._defaults
        self.rewindow(frame)

    def action_toggle_preview(self) -> None:
        pane = self.query_one("#preview-pane")
        pane.display = not pane.display
