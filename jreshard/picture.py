"""The layout picture of one tensor: its saved chunks drawn over the target shards, as text, SVG or PNG.

A :class:`LayoutPicture` holds boxes only, no tensor bytes: the saved chunks of a tensor and the target shards
(:class:`ShardBox`: a box, the ids of the devices holding it, their process, the shard's number), all in the
saved tensor's index space. It shows why a load reads more than its shards: a shard that cuts across saved
chunks needs a part of each of them.

Two dimensions are drawn, rows then columns. A tensor of rank 2 is drawn as it is; of rank 1 as a one-row
strip; of rank 0 as one cell. For rank 3 and more, the two dimensions with the most cuts (distinct inner
boundaries of saved chunks and target shards together) are drawn, the later one on a tie, and every box is
projected onto them: a cell then stands for every shard along the other dimensions (its label lists all their
devices). The caption says which dimensions are drawn.

Made by :meth:`jreshard.Plan.picture` (the shards of a planned load, of every process, with the bytes this
process needs and reads; for a mapped target, its shards traced back onto the saved tensor) or by
:func:`layout_picture` (a saved tensor against any sharding). No drawing library is needed: the text uses
box-drawing characters (or ASCII), the SVG is written as text, and the PNG is drawn with numpy and encoded
with :mod:`zlib` and :mod:`struct`.
"""

from __future__ import annotations

import html
import itertools
import math
import os
import struct
import textwrap
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .errors import InvalidArgumentError, ShardingError
from .planning import Box, _human, pieces_of

MAX_SIDE = 8192  # largest width or height of a picture, in pixels or characters
MAX_BOXES = 200_000  # boxes a picture may hold (a mapped target can trace a shard to many boxes)
SHARD, SAVED = 1, 2  # the kinds of an edge (bits: an edge of both is 3)

# Fill colours of the shards (by shard number, or by process when several processes hold shards).
PALETTE = ((141, 211, 199), (255, 255, 179), (190, 186, 218), (251, 128, 114), (128, 177, 211), (253, 180, 98),
           (179, 222, 105), (252, 205, 229), (217, 217, 217), (188, 128, 189), (204, 235, 197), (255, 237, 111))
INK = (34, 34, 34)


class ShardBox(NamedTuple):
    """A target shard's ``box`` in the saved tensor's index space (for a mapped target, one of the boxes its
    shard is read from), the ``devices`` (ids) holding it, their ``process``, and ``index``, the number of the
    target shard (the boxes traced from one shard share it; -1: its position in the picture's list)."""

    box: Box
    devices: tuple[int, ...]
    process: int = 0
    index: int = -1


Rect = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1) in the drawn dimensions


@dataclass
class LayoutPicture:
    """The saved chunks of tensor ``name`` against target shards, for drawing (:meth:`text`, :meth:`svg`,
    :meth:`png`). ``saved``: the chunks' boxes; ``shards``: :class:`ShardBox` es (or ``(box, device ids,
    process)`` tuples); ``dims``: the dimensions drawn (rows, columns), chosen when None (see the module's
    doc); ``bytes_needed`` / ``bytes_read``: what the load needs and reads for it, when known, on
    ``process`` (None: all processes); ``note``: a line added to the caption.

    Example:
        >>> p = LayoutPicture("w", (4, 8), "float32", saved=[((0, 4), (0, 4)), ((0, 4), (4, 8))],
        ...                   shards=[(((0, 2), (0, 8)), (0,), 0), (((2, 4), (0, 8)), (1,), 0)])
        >>> print(p.text(width=60, height=7))
        w  float32 (4, 8)
        saved: 2 chunks (1x2 grid); target: 2 shards on 2 devices
        rows: dim 0 (4), columns: dim 1 (8)
        ┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┯━━━━━━━━━━━━━━━━━━━━━━━━━━━━┓
        ┃             d0              ┆                            ┃
        ┃                             ┆                            ┃
        ┠─────────────────────────────┼────────────────────────────┨
        ┃             d1              ┆                            ┃
        ┃                             ┆                            ┃
        ┗━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┷━━━━━━━━━━━━━━━━━━━━━━━━━━━━┛
        ━ both  ─ target shard  ┄ saved chunk  dN: devices
    """

    name: str
    shape: tuple[int, ...]
    dtype: Any
    saved: list[Box]
    shards: list[ShardBox]
    dims: tuple[int, ...] | None = None
    bytes_needed: int | None = None
    bytes_read: int | None = None
    process: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        self.shape = tuple(int(n) for n in self.shape)
        self.dtype = np.dtype(self.dtype)
        rank = len(self.shape)
        self.saved = [_box(b, rank, f"picture of {self.name!r}: saved chunk") for b in self.saved]
        shards = []
        for i, s in enumerate(self.shards):
            if not isinstance(s, tuple) or not 2 <= len(s) <= 4:
                raise InvalidArgumentError(f"picture of {self.name!r}: shard {i} must be (box, device ids, process), "
                                           f"not {s!r}")
            s = ShardBox(*s)
            index = i if s.index is None or s.index < 0 else int(s.index)
            shards.append(ShardBox(_box(s.box, rank, f"picture of {self.name!r}: shard {i}"),
                                   tuple(int(d) for d in s.devices), int(s.process), index))
        self.shards = shards
        if len(self.saved) + len(self.shards) > MAX_BOXES:
            raise InvalidArgumentError(f"picture of {self.name!r}: {len(self.saved) + len(self.shards)} boxes, more "
                                       f"than a picture draws ({MAX_BOXES})")
        if self.dims is None:
            self.dims = _choose_dims(self.shape, [*self.saved, *(s.box for s in self.shards)])
        dims = tuple(int(d) for d in self.dims)
        if len(dims) != min(rank, 2) or len(set(dims)) != len(dims) or any(not 0 <= d < rank for d in dims):
            raise InvalidArgumentError(f"picture of {self.name!r}: dims {self.dims} must be {min(rank, 2)} distinct "
                                       f"dimensions of the shape {self.shape}")
        self.dims = tuple(sorted(dims))

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def _sizes(self) -> tuple[int, int]:
        dims = self.dims or ()
        rows = self.shape[dims[0]] if len(dims) == 2 else 1
        cols = self.shape[dims[-1]] if dims else 1
        return max(rows, 1), max(cols, 1)

    def _rect(self, box: Box) -> Rect:
        dims = self.dims or ()
        r = box[dims[0]] if len(dims) == 2 else (0, 1)
        c = box[dims[-1]] if dims else (0, 1)
        rows, cols = (self.shape[dims[0]] if len(dims) == 2 else 1), (self.shape[dims[-1]] if dims else 1)
        if rows == 0:
            r = (0, 1)
        if cols == 0:
            c = (0, 1)
        return r[0], r[1], c[0], c[1]

    def _cells(self) -> list[tuple[Rect, list[int]]]:
        """The distinct drawn rectangles of the shards, each with the shards (positions) it stands for."""
        return self._memo("cells", lambda: list(_group(self._rect(s.box) for s in self.shards).items()))

    def _saved_rects(self) -> list[Rect]:
        return self._memo("saved", lambda: list(dict.fromkeys(self._rect(b) for b in self.saved)))

    def _memo(self, what: str, make: Any) -> Any:
        """``make()``, remembered while the dims and the numbers of boxes stay the same."""
        key = (what, self.dims, len(self.saved), len(self.shards))
        memo = self.__dict__.setdefault("_memos", {})
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def _saved_cuts(self, ypos: dict[int, int], xpos: dict[int, int]) -> tuple[list[int], list[int]]:
        """The drawn positions of the saved chunks' edges, rows and columns, sorted."""
        rects = self._saved_rects()
        return (sorted({ypos[r[k]] for r in rects for k in (0, 1)}), sorted({xpos[r[k]] for r in rects for k in (2, 3)}))

    def _bounds(self) -> tuple[list[int], list[int]]:
        rows, cols = self._sizes
        rb, cb = {0, rows}, {0, cols}
        for r0, r1, c0, c1 in [*self._saved_rects(), *(rect for rect, _ in self._cells())]:
            rb.update((r0, r1))
            cb.update((c0, c1))
        return sorted(rb), sorted(cb)

    # -- words --------------------------------------------------------------------------------------

    def _label(self, members: Sequence[int], processes: bool) -> str:
        shards = [self.shards[i] for i in members]
        devices = _ranges([d for s in shards for d in s.devices])
        if processes:
            return f"p{_ranges([s.process for s in shards])}:d{devices}"
        return f"d{devices}"

    def _short_label(self, members: Sequence[int]) -> str:
        indices = sorted({self.shards[i].index for i in members})
        return f"#{indices[0]}" + (f"+{len(indices) - 1}" if len(indices) > 1 else "")

    def caption(self) -> list[str]:
        """The caption's lines: tensor, dtype and shape; saved chunks and target shards (and the bytes needed and
        read, when known); the dimensions drawn; the note.

        Example:
            >>> LayoutPicture("b", (8,), "int8", [((0, 8),)], [(((0, 8),), (0, 1), 0)]).caption()
            ['b  int8 (8,)', 'saved: 1 chunk; target: 1 shard on 2 devices', 'a strip: dim 0 (8)']
        """
        saved = f"saved: {_count(len(self.saved), 'chunk')}{_grid_text(self.saved, self.shape)}"
        devices = {d for s in self.shards for d in s.devices}
        processes = {s.process for s in self.shards}
        target = (f"target: {_count(len({s.index for s in self.shards}), 'shard')} on {_count(len(devices), 'device')}"
                  + (f" of {len(processes)} processes" if len(processes) > 1 else ""))
        line = f"{saved}; {target}"
        if self.bytes_needed is not None:
            line += f"; needed {_human(self.bytes_needed)}"
            if self.bytes_read is not None:
                ampl = self.bytes_read / self.bytes_needed if self.bytes_needed else 1.0
                line += f", read {_human(self.bytes_read)} ({ampl:.2f}x)"
            if self.process is not None:
                line += f" on process {self.process}"
        dims = self.dims or ()
        if len(dims) == 2:
            drawn = f"rows: dim {dims[0]} ({self.shape[dims[0]]}), columns: dim {dims[1]} ({self.shape[dims[1]]})"
            if len(self.shape) > 2:
                rest = [d for d in range(len(self.shape)) if d not in dims]
                drawn += (f" of {len(self.shape)} dims (the two with most cuts); each cell stands for every shard "
                          f"along dim{'s' if len(rest) > 1 else ''} {', '.join(map(str, rest))}")
        elif dims:
            drawn = f"a strip: dim {dims[0]} ({self.shape[dims[0]]})"
        else:
            drawn = "a scalar"
        lines = [f"{self.name}  {self.dtype} {self.shape}", line, drawn]
        if self.note:
            lines.append(self.note)
        return lines

    def shard_colors(self) -> list[tuple[int, int, int]]:
        """The RGB fill colour of each shard in :meth:`svg` and :meth:`png`: by process when several processes
        hold shards, else by shard number.

        Example:
            >>> p = LayoutPicture("w", (2,), "f4", [((0, 2),)], [(((0, 1),), (0,), 0), (((1, 2),), (1,), 0)])
            >>> p.shard_colors()
            [(141, 211, 199), (255, 255, 179)]
        """
        by_process = len({s.process for s in self.shards}) > 1
        return [PALETTE[(s.process if by_process else s.index) % len(PALETTE)] for s in self.shards]

    # -- text -----------------------------------------------------------------------------------------

    def text(self, width: int = 72, height: int = 20, ascii: bool = False) -> str:
        """The picture for a terminal: the caption, then a drawing ``width`` characters wide and at most
        ``height`` lines high, then a legend. Target shard edges are thin lines (``─ │``), saved chunk edges
        dashed (``┄ ┆``), edges of both heavy (``━ ┃``); with ``ascii=True``: ``- |``, ``. :`` and ``= #``.
        Each cell is labelled with the ids of the devices holding it (``d0-3``; ``p1:d4`` with several
        processes), or its shard number (``#5``) where that does not fit, or left blank; every boundary keeps
        a line of its own while there are at most ``(width - 1) / 2`` of them across (``(height - 1) / 2``
        down), and the caption counts those merged beyond that.

        Example:
            >>> p = LayoutPicture("v", (8,), "float32", [((0, 8),)], [(((0, 4),), (0,), 0), (((4, 8),), (1,), 0)])
            >>> print(p.text(width=60, height=3, ascii=True))
            v  float32 (8,)
            saved: 1 chunk; target: 2 shards on 2 devices
            a strip: dim 0 (8)
            +=============================+============================+
            #             d0              |             d1             #
            +=============================+============================+
            = # both  - | target shard  . : saved chunk  dN: devices
        """
        _check_size(width, height, "text", (4, 3))
        grid, merged, unlabeled = self._text_grid(width, height, ascii)
        lines = self.caption()
        if merged:
            lines.append(f"{_count(merged, 'boundary', 'boundaries')} merged at this size")
        if unlabeled:
            lines.append(f"{_count(unlabeled, 'cell')} too small for a label")
        out = [w for line in lines for w in _wrap(line, width)]
        out.extend("".join(row).rstrip() for row in grid)
        legend = ("= # both  - | target shard  . : saved chunk  dN: devices" if ascii else
                  "━ both  ─ target shard  ┄ saved chunk  dN: devices")
        out.extend(_wrap(legend.replace("  ", "; "), width, "  "))
        return "\n".join(out)

    def _text_grid(self, width: int, height: int, ascii: bool) -> tuple[np.ndarray, int, int]:
        rows_b, cols_b = self._bounds()
        rows, cols = self._sizes
        if len(self.dims or ()) < 2:
            lines = 3
        else:
            lines = min(height, max(3, 4 * (len(rows_b) - 1) + 1))
        ypos, merged_r = _positions(rows_b, rows, lines - 1, 2)
        xpos, merged_c = _positions(cols_b, cols, width - 1, 2)
        frame = [(0, rows, 0, cols)]  # the tensor's edge is an edge of both
        cells = self._cells()
        hseg = np.zeros((lines, width - 1), np.uint8)
        vseg = np.zeros((lines - 1, width), np.uint8)
        for kind, rects in ((SHARD, frame + [rect for rect, _ in cells]), (SAVED, frame + self._saved_rects())):
            horizontal, vertical = _edges(rects, ypos, xpos)
            hseg[_cover(horizontal, lines, width - 1)] |= kind
            vseg[_cover(vertical, width, lines - 1).T] |= kind
        grid = _compose(hseg, vseg, ascii)
        processes = len({s.process for s in self.shards}) > 1
        unlabeled = 0
        for rect, members in cells:
            y0, y1, x0, x1 = ypos[rect[0]], ypos[rect[1]], xpos[rect[2]], xpos[rect[3]]
            if not any(_place(grid, label, y0, y1, x0, x1)
                       for label in (self._label(members, processes), self._short_label(members))):
                unlabeled += 1
        return grid, merged_r + merged_c, unlabeled

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return (f"<jreshard LayoutPicture {self.name!r} {self.dtype} {self.shape}: {_count(len(self.saved), 'saved chunk')}, "
                f"{_count(len(self.shards), 'shard box', 'shard boxes')}>")

    # -- SVG ------------------------------------------------------------------------------------------

    def svg(self, width: int = 480, height: int | None = None) -> str:
        """The picture as an inline SVG document (for HTML), ``width`` pixels wide: the caption, then target
        shards as filled rectangles (coloured as :meth:`shard_colors`, labelled with their devices where the
        label fits, each with a tooltip), saved chunks as dashed outlines. ``height`` (None: from the drawn
        dimensions' proportions, at most ``width``) includes the caption.

        Example:
            >>> p = LayoutPicture("<w>", (4,), "f4", [((0, 4),)], [(((0, 4),), (0,), 0)])
            >>> s = p.svg(width=200)
            >>> s.startswith("<svg") and "&lt;w&gt;" in s and "<w>" not in s
            True
        """
        caption = [w for line in self.caption() for w in _wrap(line, max(8, width // 7))]
        top = 16 * len(caption) + 6
        if height is None:
            rows, cols = self._sizes
            if len(self.dims or ()) < 2:
                area = 40
            else:
                area = int(min(width, max(60, width / 8, width * rows / cols)))
            height = top + area
        _check_size(width, height, "svg", (16, top + 8))
        x0, y0, w, h = 1, top, width - 2, height - top - 1
        rows_b, cols_b = self._bounds()
        rows, cols = self._sizes
        ypos, _ = _positions(rows_b, rows, h, 3)
        xpos, _ = _positions(cols_b, cols, w, 3)
        colors = self.shard_colors()
        processes = len({s.process for s in self.shards}) > 1
        cuts_y, cuts_x = self._saved_cuts(ypos, xpos)
        out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">'),
               f"<title>{_esc(' / '.join(self.caption()))}</title>"]
        for i, line in enumerate(caption):
            out.append(f'<text x="2" y="{14 + 16 * i}" font-size="12" fill="#222">{_esc(line)}</text>')
        for rect, members in self._cells():
            rx, ry = x0 + xpos[rect[2]], y0 + ypos[rect[0]]
            rw, rh = xpos[rect[3]] - xpos[rect[2]], ypos[rect[1]] - ypos[rect[0]]
            r, g, b = colors[members[0]]
            tip = "; ".join(f"shard {self.shards[i].index}: {_box_text(self.shards[i].box)} on devices "
                            f"{_ranges(self.shards[i].devices)} (process {self.shards[i].process})" for i in members[:20])
            if len(members) > 20:
                tip += f"; ... {len(members) - 20} more"
            out.append(f'<rect x="{rx}" y="{ry}" width="{rw}" height="{rh}" fill="#{r:02x}{g:02x}{b:02x}" '
                       f'stroke="#fff" stroke-width="1"><title>{_esc(tip)}</title></rect>')
            fy0, fy1 = _free(ypos[rect[0]], ypos[rect[1]], cuts_y)  # the largest part no saved edge crosses
            fx0, fx1 = _free(xpos[rect[2]], xpos[rect[3]], cuts_x)
            label = self._label(members, processes)
            if len(label) * 7 + 4 > fx1 - fx0:
                label = self._short_label(members)
            if len(label) * 7 + 4 <= fx1 - fx0 and fy1 - fy0 >= 14:
                out.append(f'<text x="{x0 + (fx0 + fx1) / 2:g}" y="{y0 + (fy0 + fy1) / 2 + 4:g}" text-anchor="middle" '
                           f'fill="#222" pointer-events="none">{_esc(label)}</text>')
        horizontal, vertical = _edges(self._saved_rects(), ypos, xpos)  # one line per run of saved edges
        path = [f"M{x0 + a} {y0 + y}H{x0 + b}" for y, a, b in _merged(horizontal)]
        path += [f"M{x0 + x} {y0 + a}V{y0 + b}" for x, a, b in _merged(vertical)]
        if path:
            out.append(f'<path d="{"".join(path)}" fill="none" stroke="#222" stroke-width="1.5" '
                       'stroke-dasharray="5,3" pointer-events="none"/>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#222" stroke-width="1"/>')
        out.append("</svg>")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        return self.svg()

    # -- PNG ------------------------------------------------------------------------------------------

    def png(self, width: int = 800, height: int = 600) -> bytes:
        """The picture as a PNG of exactly ``width`` x ``height`` pixels (RGB, 8 bits), without the caption:
        shards filled with :meth:`shard_colors` (white between them), labelled with their device ids in digits
        where they fit, saved chunks as dark dashed outlines, the tensor's edge in dark.

        Example:
            >>> p = LayoutPicture("w", (2, 2), "f4", [((0, 2), (0, 2))], [(((0, 2), (0, 2)), (0,), 0)])
            >>> data = p.png(width=40, height=30)
            >>> data[:8] == b"\\x89PNG\\r\\n\\x1a\\n", struct.unpack(">II", data[16:24])
            (True, (40, 30))
        """
        _check_size(width, height, "png", (1, 1))
        return encode_png(self.raster(width, height))

    def save_png(self, path: str | os.PathLike, width: int = 800, height: int = 600) -> None:
        """Write :meth:`png` to ``path``.

        Example:
            >>> import os, tempfile
            >>> p = LayoutPicture("w", (), "f4", [()], [((), (0,), 0)])
            >>> path = os.path.join(tempfile.mkdtemp(), "w.png")
            >>> p.save_png(path, width=10, height=10); os.path.getsize(path) > 0
            True
        """
        data = self.png(width, height)
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise InvalidArgumentError(f"cannot write the picture of {self.name!r} to {os.fspath(path)!r}: {e}") from None

    def raster(self, width: int, height: int) -> np.ndarray:
        """The pixels of :meth:`png`: a ``(height, width, 3)`` uint8 array.

        Example:
            >>> LayoutPicture("w", (4,), "f4", [((0, 4),)], [(((0, 4),), (0,), 0)]).raster(20, 10).shape
            (10, 20, 3)
        """
        _check_size(width, height, "png", (1, 1))
        img = np.full((height, width, 3), 255, np.uint8)
        m = 2 if min(width, height) >= 24 else 0
        w, h = width - 1 - 2 * m, height - 1 - 2 * m
        rows_b, cols_b = self._bounds()
        rows, cols = self._sizes
        ypos = {k: v + m for k, v in _positions(rows_b, rows, h, 3)[0].items()}
        xpos = {k: v + m for k, v in _positions(cols_b, cols, w, 3)[0].items()}
        colors = self.shard_colors()
        cells = self._cells()
        for rect, members in cells:
            y0, y1, x0, x1 = ypos[rect[0]], ypos[rect[1]], xpos[rect[2]], xpos[rect[3]]
            img[y0 : y1 + 1, x0 : x1 + 1] = colors[members[0]]
        wide = [rect for rect, _ in cells  # white between shards, where they are wide enough
                if ypos[rect[1]] - ypos[rect[0]] >= 3 and xpos[rect[3]] - xpos[rect[2]] >= 3]
        horizontal, vertical = _edges(wide, ypos, xpos)
        img[_cover(horizontal, height, width, inclusive=True) | _cover(vertical, width, height, inclusive=True).T] = 255
        processes = len({s.process for s in self.shards}) > 1
        cuts_y, cuts_x = self._saved_cuts(ypos, xpos)
        for rect, members in cells:  # in the largest part of the cell that no saved edge crosses
            y0, y1 = _free(ypos[rect[0]], ypos[rect[1]], cuts_y)
            x0, x1 = _free(xpos[rect[2]], xpos[rect[3]], cuts_x)
            for label in (self._label(members, processes), self._short_label(members)):
                if _glyphs(img, label, y0, y1, x0, x1):
                    break
        # saved chunk edges: dashed (8 on, 4 off), 2 pixels thick (the row or column after, or before at the end)
        horizontal, vertical = _edges(self._saved_rects(), ypos, xpos)
        across = _cover(horizontal, height, width, inclusive=True)
        down = _cover(vertical, width, height, inclusive=True).T
        across |= np.vstack([across[-1:], across[:-1]]) if height > 1 else across
        down |= np.hstack([down[:, -1:], down[:, :-1]]) if width > 1 else down
        if height > 1:
            across[-2] |= across[-1]
        if width > 1:
            down[:, -2] |= down[:, -1]
        dash_x = (np.arange(width) % 12) < 8
        dash_y = (np.arange(height) % 12) < 8
        img[(across & dash_x[None, :]) | (down & dash_y[:, None])] = INK
        y0, y1, x0, x1 = ypos[0], ypos[rows], xpos[0], xpos[cols]
        img[[y0, y1], x0 : x1 + 1] = INK
        img[y0 : y1 + 1, [x0, x1]] = INK
        return img


def layout_picture(ckpt: Any, name: str, sharding: Any) -> LayoutPicture:
    """The picture of saved tensor ``name`` of ``ckpt`` against the shards of ``sharding`` over its shape
    (every process's; a ``jax.ShapeDtypeStruct`` or ``jax.Array`` gives its sharding). Nothing is read.

    Example:
        >>> import jax, numpy as np, jreshard
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> ckpt = jreshard.open(jreshard.sample_path())
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
        >>> p = layout_picture(ckpt, "model.embed.weight", NamedSharding(mesh, P("x")))
        >>> p.caption()[1]
        'saved: 4 chunks (4x1 grid); target: 1 shard on 1 device'
    """
    info = ckpt.tensor(name)
    sharding = getattr(sharding, "sharding", sharding)
    if not hasattr(sharding, "devices_indices_map"):
        raise InvalidArgumentError(f"layout_picture({name!r}): {type(sharding).__name__} is not a jax sharding (give "
                                   "a jax.sharding.Sharding, a jax.ShapeDtypeStruct with one, or a jax.Array)")
    try:
        sharding.shard_shape(info.shape)
    except Exception as e:  # noqa: BLE001 - jax raises IndivisibleError / ValueError
        raise ShardingError(f"{ckpt.source}: tensor {name!r} of shape {info.shape}: the sharding cannot tile it: "
                            f"{e}") from None
    pieces = pieces_of(name, info.shape, sharding, addressable_only=False)
    shards = [ShardBox(p.box, tuple(d.id for d in p.devices), p.process, k) for k, p in enumerate(pieces)]
    return LayoutPicture(name, info.shape, info.dtype, [_chunk_box(c) for c in info.chunks], shards)


def target_picture(target: Any, tensors: Any, saved: str | None = None, *, bytes_needed: int | None = None,
                   bytes_read: int | None = None, process: int | None = None) -> LayoutPicture:
    """The picture of a planned target (:class:`jreshard.program.Target`) on the saved tensor it reads
    (``saved``: which one, for a target read from several; default the first): every process's shards, and for
    a mapped target (a view), each shard's boxes traced back onto the saved tensor."""
    view = target.view
    sources = view.names()
    if saved is None:
        saved = sources[0]
    elif saved not in sources:
        raise InvalidArgumentError(f"picture({target.name!r}, saved={saved!r}): the target is read from "
                                   f"{', '.join(map(repr, sources[:8]))}{' ...' if len(sources) > 8 else ''}, "
                                   f"not from {saved!r}")
    info = tensors[saved]
    pieces = pieces_of(target.name, target.shape, target.sharding, addressable_only=False)
    direct = view._op == "saved"
    shards: list[ShardBox] = []
    for k, piece in enumerate(pieces):
        ids = tuple(d.id for d in piece.devices)
        boxes = [piece.box] if direct else [leaf.box for leaf in view.trace(piece.box) if leaf.name == saved]
        shards.extend(ShardBox(b, ids, piece.process, k) for b in boxes)
        if len(shards) > MAX_BOXES:
            raise InvalidArgumentError(f"picture({target.name!r}): its shards trace to more than {MAX_BOXES} boxes of "
                                       f"{saved!r}, more than a picture draws")
    note = ""
    if not direct:
        note = (f"target {target.name!r} {target.shape} = {view!r}: its {_count(len(pieces), 'shard')} traced "
                f"onto the saved tensor")
        if len(sources) > 1:
            note += (f" ({saved!r} is 1 of the {len(sources)} saved tensors it reads; picture({target.name!r}, "
                     "saved=...) draws another)")
    return LayoutPicture(saved, info.shape, info.dtype, [_chunk_box(c) for c in info.chunks], shards,
                         bytes_needed=bytes_needed, bytes_read=bytes_read, process=process, note=note)


def encode_png(img: np.ndarray) -> bytes:
    """An RGB uint8 array ``(height, width, 3)`` as PNG bytes (8 bits per channel, no interlace).

    Example:
        >>> encode_png(np.zeros((1, 1, 3), np.uint8))[12:16]
        b'IHDR'
    """
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w, _ = img.shape
    raw = np.zeros((h, 1 + 3 * w), np.uint8)  # each row: filter type 0, then its pixels
    raw[:, 1:] = img.reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


# -- helpers ------------------------------------------------------------------------------------------


def _group(keys: Any) -> dict[Any, list[int]]:
    """The positions of each distinct key, in first-seen order."""
    out: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def _box(box: Any, rank: int, what: str) -> Box:
    try:
        out = tuple((int(a), int(b)) for a, b in box)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} {box!r} is not a box (per dim (start, stop))") from None
    if len(out) != rank:
        raise InvalidArgumentError(f"{what} {box!r} has {len(out)} dims, the tensor {rank}")
    return out


def _chunk_box(chunk: Any) -> Box:
    return tuple((o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))


def _choose_dims(shape: tuple[int, ...], boxes: Sequence[Box]) -> tuple[int, ...]:
    """All dims up to rank 2; beyond, the two with the most inner boundaries (the later on a tie)."""
    rank = len(shape)
    if rank <= 2:
        return tuple(range(rank))
    cuts = [len({x for b in boxes for x in b[d]} - {0, shape[d]}) for d in range(rank)]
    return tuple(sorted(sorted(range(rank), key=lambda d: (cuts[d], d), reverse=True)[:2]))


def _positions(bounds: Sequence[int], size: int, extent: int, min_gap: int) -> tuple[dict[int, int], int]:
    """Positions in ``[0, extent]`` of the sorted ``bounds`` (``0 ... size``), and how many of them share a
    position with another: proportional to the bounds beyond ``min_gap`` per interval when every interval can
    have that much, else proportional alone (rounded; close bounds then merge).

    Example:
        >>> _positions([0, 1, 10], 10, 20, 2)
        ({0: 0, 1: 4, 10: 20}, 0)
        >>> _positions([0, 1, 2, 3], 3, 4, 2)
        ({0: 0, 1: 1, 2: 3, 3: 4}, 0)
    """
    k = len(bounds) - 1
    size = max(size, 1)
    if k * min_gap <= extent:
        spare = extent - k * min_gap
        pos = {b: i * min_gap + round(spare * b / size) for i, b in enumerate(bounds)}
    else:
        pos = {b: round(extent * b / size) for b in bounds}
    return pos, len(bounds) - len(set(pos.values()))


def _junctions() -> tuple[str, ...]:
    """The box-drawing character of every combination of arms (up, down, left, right), each 0 (none), 1
    (light) or 2 (heavy), at index ``27 up + 9 down + 3 left + right``, from the characters' Unicode names."""
    table = [" "] * 81
    dirs = {"UP": "U", "DOWN": "D", "LEFT": "L", "RIGHT": "R", "VERTICAL": "UD", "HORIZONTAL": "LR"}
    weights = {"LIGHT": 1, "HEAVY": 2}
    for cp in range(0x2500, 0x2580):
        words = unicodedata.name(chr(cp)).split()[2:]
        if not set(words) <= {*dirs, *weights, "AND"}:
            continue  # dashed, double, arcs, diagonals
        arms: dict[str, int] = {}
        weight, pending = 0, ""
        prefix = words[0] in weights  # "LIGHT DOWN AND HEAVY UP" vs "DOWN LIGHT AND UP HEAVY"
        for word in words:
            if word in weights:
                weight = weights[word]
                if not prefix:
                    arms.update(dict.fromkeys(pending, weight))
                    pending = ""
            elif word in dirs:
                if prefix:
                    arms.update(dict.fromkeys(dirs[word], weight))
                else:
                    pending += dirs[word]
        table[27 * arms.get("U", 0) + 9 * arms.get("D", 0) + 3 * arms.get("L", 0) + arms.get("R", 0)] = chr(cp)
    return tuple(table)


_UNICODE = np.array(_junctions())


def _compose(hseg: np.ndarray, vseg: np.ndarray, ascii: bool) -> np.ndarray:
    """The characters of a drawing from its edge segments: ``hseg[y, x]`` joins ``(y, x)`` and ``(y, x + 1)``,
    ``vseg[y, x]`` joins ``(y, x)`` and ``(y + 1, x)``; each holds kind bits (SHARD, SAVED)."""
    lines, width = hseg.shape[0], vseg.shape[1]
    up, down, left, right = (np.zeros((lines, width), np.uint8) for _ in range(4))
    up[1:] = vseg
    down[:-1] = vseg
    left[:, 1:] = hseg
    right[:, :-1] = hseg
    weight = np.array([0, 1, 1, 2], np.uint8)  # shard only: light, saved only: light (dashed when straight)
    code = 27 * weight[up] + 9 * weight[down] + 3 * weight[left] + weight[right]
    across = (up == 0) & (down == 0)
    along = (left == 0) & (right == 0)
    dashed_h = across & (left == SAVED) & (right == SAVED)
    dashed_v = along & (up == SAVED) & (down == SAVED)
    if ascii:
        heavy = np.maximum.reduce([weight[a] for a in (up, down, left, right)]) == 2
        grid = np.full(code.shape, "+", dtype="<U1")
        grid[code == 0] = " "
        grid[across & ~along] = np.where(heavy, "=", "-")[across & ~along]
        grid[along & ~across] = np.where(heavy, "#", "|")[along & ~across]
        grid[dashed_h] = "."
        grid[dashed_v] = ":"
        return grid
    grid = _UNICODE[code]
    grid[dashed_h] = "┄"
    grid[dashed_v] = "┆"
    return grid


def _place(grid: np.ndarray, label: str, y0: int, y1: int, x0: int, x1: int) -> bool:
    """Write ``label`` inside the cell with edges at rows ``y0, y1`` and columns ``x0, x1``, on blank characters
    only (never over a line or another label), near the middle; False where it does not fit."""
    n = len(label)
    if x1 - x0 - 1 < n or y1 - y0 < 2:
        return False
    middle = (y0 + y1) // 2
    for y in sorted(range(y0 + 1, y1), key=lambda r: (abs(r - middle), r)):
        row = grid[y, x0 + 1 : x1]
        blank = np.concatenate([[False], row == " ", [False]])
        edges = np.flatnonzero(np.diff(blank.astype(np.int8)))
        runs = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= n]
        if not runs:
            continue
        center = (len(row) - n) // 2
        inside = [r for r in runs if r[0] <= center and center + n <= r[1]]
        a, b = inside[0] if inside else max(runs, key=lambda r: r[1] - r[0])
        start = a + (b - a - n) // 2  # centred in the blank run it takes
        grid[y, x0 + 1 + start : x0 + 1 + start + n] = list(label)
        return True
    return False


# A 3x5 bitmap font for the PNG labels (rows top to bottom, 3 bits each, left bit first).
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "-": "000000111000000", ",": "000000000010100",
    "#": "101111101111101", "+": "000010111010000", ":": "000010000010000", "p": "000111101111100",
    "d": "001001111101111",
}


def _glyphs(img: np.ndarray, label: str, y0: int, y1: int, x0: int, x1: int) -> bool:
    """Draw ``label`` centred in the cell, at the largest scale (up to 3) that fits; False when none does."""
    if any(ch not in _FONT for ch in label):
        return False
    for scale in (3, 2, 1):
        w, h = (4 * len(label) - 1) * scale, 5 * scale
        if w + 4 <= x1 - x0 and h + 4 <= y1 - y0:
            top, left = (y0 + y1 - h) // 2 + 1, (x0 + x1 - w) // 2 + 1
            for i, ch in enumerate(label):
                bits = np.array([int(b) for b in _FONT[ch]], bool).reshape(5, 3)
                mask = np.kron(bits, np.ones((scale, scale), bool))
                region = img[top : top + h, left + 4 * i * scale : left + 4 * i * scale + 3 * scale]
                region[mask] = INK
            return True
    return False


def _free(lo: int, hi: int, cuts: Sequence[int]) -> tuple[int, int]:
    """The largest interval of ``[lo, hi]`` between the sorted ``cuts`` that fall inside it.

    Example:
        >>> _free(0, 100, [0, 30, 100, 140])
        (30, 100)
    """
    inner = [c for c in cuts if lo < c < hi]
    edges = [lo, *inner, hi]
    return max(itertools.pairwise(edges), key=lambda e: e[1] - e[0])


def _edges(rects: Sequence[Rect], ypos: dict[int, int], xpos: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The edges of ``rects`` at their drawn positions, without repeats: horizontal ones as rows ``(y, x0, x1)``
    and vertical ones as rows ``(x, y0, y1)``."""
    if not rects:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64)
    r = np.array(rects, np.int64)
    ykeys, xkeys = np.array(sorted(ypos), np.int64), np.array(sorted(xpos), np.int64)
    ys = np.array([ypos[k] for k in ykeys.tolist()], np.int64)[np.searchsorted(ykeys, r[:, :2])]
    xs = np.array([xpos[k] for k in xkeys.tolist()], np.int64)[np.searchsorted(xkeys, r[:, 2:])]
    horizontal = np.concatenate([np.stack([ys[:, k], xs[:, 0], xs[:, 1]], axis=1) for k in (0, 1)])
    vertical = np.concatenate([np.stack([xs[:, k], ys[:, 0], ys[:, 1]], axis=1) for k in (0, 1)])
    return _unique_rows(horizontal), _unique_rows(vertical)


def _unique_rows(a: np.ndarray) -> np.ndarray:
    """The distinct rows of a non-negative ``(n, 3)`` int array, sorted (one key per row: faster than
    ``np.unique(axis=0)``)."""
    k = int(a.max()) + 1
    keys = np.unique((a[:, 0] * k + a[:, 1]) * k + a[:, 2])
    return np.stack([keys // (k * k), keys // k % k, keys % k], axis=1)


def _cover(segments: np.ndarray, lines: int, length: int, inclusive: bool = False) -> np.ndarray:
    """A ``(lines, length)`` mask of the segments ``(line, start, stop)``: ``[start, stop)`` of each line, or
    ``[start, stop]`` when ``inclusive``.

    Example:
        >>> _cover(np.array([[0, 1, 3], [1, 0, 1]]), 2, 4).astype(int).tolist()
        [[0, 1, 1, 0], [1, 0, 0, 0]]
    """
    acc = np.zeros((lines, length + 1), np.int32)
    if len(segments):
        stops = np.minimum(segments[:, 2] + (1 if inclusive else 0), length)
        np.add.at(acc, (segments[:, 0], segments[:, 1]), 1)
        np.add.at(acc, (segments[:, 0], stops), -1)
    return np.cumsum(acc, axis=1)[:, :length] > 0


def _merged(segments: np.ndarray) -> list[tuple[int, int, int]]:
    """Segments ``(line, start, stop)`` (sorted, as :func:`_edges` gives them) with those of a line that meet or
    overlap joined.

    Example:
        >>> _merged(np.array([[0, 0, 2], [0, 2, 5], [0, 7, 9], [3, 0, 1]]))
        [(0, 0, 5), (0, 7, 9), (3, 0, 1)]
    """
    out: list[tuple[int, int, int]] = []
    for line, a, b in segments.tolist():
        if out and out[-1][0] == line and a <= out[-1][2]:
            out[-1] = (line, out[-1][1], max(out[-1][2], b))
        else:
            out.append((line, a, b))
    return out


def _check_size(width: Any, height: Any, what: str, least: tuple[int, int]) -> None:
    for name, value, low in (("width", width, least[0]), ("height", height, least[1])):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentError(f"{what}: {name} must be an integer, not {value!r}")
        if not low <= value <= MAX_SIDE:
            raise InvalidArgumentError(f"{what}: {name} must be between {low} and {MAX_SIDE}, not {value}")


def _ranges(ids: Sequence[int]) -> str:
    """Sorted ids with runs of 3 or more as ``a-b``.

    Example:
        >>> _ranges([5, 0, 1, 2, 3, 7, 8])
        '0-3,5,7,8'
    """
    ids = sorted(set(ids))
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(f"{ids[i]}-{ids[j]}" if j - i >= 2 else ",".join(map(str, ids[i : j + 1])))
        i = j + 1
    return ",".join(parts)


def _grid_text(boxes: Sequence[Box], shape: tuple[int, ...]) -> str:
    """`` (2x4 grid)`` when the boxes form a Cartesian grid, `` (irregular)`` when not, ``""`` for scalars."""
    if not shape or len(boxes) <= 1:
        return ""
    cuts = [sorted({x for b in boxes for x in b[d]} | {0, n}) for d, n in enumerate(shape)]
    cells = math.prod(len(c) - 1 for c in cuts)
    nxt = [dict(itertools.pairwise(c)) for c in cuts]  # each cut's next one
    same = cells == len(set(boxes)) and all(all(b[d][1] == nxt[d].get(b[d][0]) for d in range(len(shape)))
                                            for b in boxes)
    return f" ({'x'.join(str(len(c) - 1) for c in cuts)} grid)" if same else " (irregular)"


def _wrap(line: str, width: int, sep: str = "; ") -> list[str]:
    """``line`` in lines of at most ``width`` characters, broken after its ``"; "`` separators where possible.

    Example:
        >>> _wrap("saved: 4 chunks; needed 4.00 KiB", 20)
        ['saved: 4 chunks;', 'needed 4.00 KiB']
    """
    out: list[str] = []
    cur = ""
    parts = line.split("; ")
    for i, part in enumerate(parts):
        part += sep.rstrip() if i < len(parts) - 1 else ""
        if cur and len(cur) + len(sep) - len(sep.rstrip()) + len(part) <= width:
            cur += sep[len(sep.rstrip()):] + part
            continue
        if cur:
            out.append(cur)
        pieces = textwrap.wrap(part, width) or [""]
        out.extend(pieces[:-1])
        cur = pieces[-1]
    out.append(cur)
    return out


def _box_text(box: Box) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)
