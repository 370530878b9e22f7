"""What a reader watches: the terminal view of the denoising (`LiveView`) and the trajectory picture.

`LiveView` is a streamer for `generate(streamer=...)`; `save_trajectory` draws which token was committed at which
denoising step, from `output_history=True` (`commit_steps`).
"""

from __future__ import annotations

import math
import os
import shutil
import sys


def id_list(value) -> list[int]:
    """A token id, a list of ids or None as a list (tokenizers and generation configs hold either)."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


class LiveView:
    """A streamer that redraws the answer canvas after every denoising step (masked positions shown as `░`).

    `generate` calls `put_draft(value=[1, N] canvas)` after every step (transformers' `TextDiffusionStreamer`
    convention) and `put()` with the prompt and the committed tokens, which this view does not need.
    """

    def __init__(self, tokenizer, mask_token_id: int, stream=None):
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.stream = stream or sys.stdout
        self.eos = set(id_list(tokenizer.eos_token_id))
        self.previous = None
        self.lines = 0
        self.drafts = 0
        # A token's text is read after a fixed anchor token, so that SentencePiece word starts keep their space.
        self.anchor = tokenizer("a", add_special_tokens=False).input_ids[:1]
        self.anchor_text = tokenizer.decode(self.anchor)
        self.pieces: dict[int, str] = {}

    def piece(self, token: int) -> str:
        if token not in self.pieces:
            text = self.tokenizer.decode(self.anchor + [token], skip_special_tokens=True)
            self.pieces[token] = text[len(self.anchor_text) :]
        return self.pieces[token]

    def put(self, value) -> None:
        pass

    def put_draft(self, value) -> None:
        tokens = value[0].tolist()
        pieces = []
        for index, token in enumerate(tokens):
            if token == self.mask_token_id:
                pieces.append("\033[2m░\033[0m")
                continue
            text = self.piece(token)
            new = self.previous is not None and self.previous[index] == self.mask_token_id
            pieces.append(f"\033[1;32m{text}\033[0m" if new else text)
            if token in self.eos:
                break
        self.previous = tokens
        self.drafts += 1
        rendered = "".join(pieces)
        if self.lines:
            self.stream.write(f"\033[{self.lines - 1}F" if self.lines > 1 else "\r")
        self.stream.write("\033[J" + rendered)
        self.stream.flush()
        width = shutil.get_terminal_size().columns
        plain = rendered.replace("\033[2m░\033[0m", "x")
        for code in ("\033[1;32m", "\033[0m"):
            plain = plain.replace(code, "")
        self.lines = sum(max(1, math.ceil(len(line) / width)) for line in plain.split("\n"))

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def commit_steps(history, mask_token_id: int):
    """`[N]` step at which each answer position was first committed (-1: never), from `history` `[S, 1, N]`."""
    import torch

    is_committed = history[:, 0] != mask_token_id  # [S, N]
    first = is_committed.float().argmax(0)  # [N]
    return torch.where(is_committed.any(0), first, torch.full_like(first, -1))


def save_trajectory(
    history,
    tokenizer,
    mask_token_id: int,
    path: str,
    *,
    title: str = "",
    block_size: int | None = None,
    offset: int = 0,
    columns: int = 16,
) -> str | None:
    """Save a PNG of the denoising trajectory of one answer (`history` `[S, 1, N]`, from `output_history=True`).

    Top: the answer's tokens in reading order, each coloured by the step that committed it, with the block
    boundaries (position `offset + i` divisible by `block_size`, `offset` being the prompt length). Bottom: commit
    step against position (a token-by-token AR decoder would be the diagonal; several tokens in one step are
    parallel decoding). Returns the path, or None (with a one-line note) without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('(trajectory PNG skipped: `pip install matplotlib` or `pip install "peft-diffusion[demo]"`)')
        return None
    steps = commit_steps(history, mask_token_id).tolist()
    final = history[-1, 0].tolist()
    eos = set(id_list(tokenizer.eos_token_id))
    length = next((index + 1 for index, token in enumerate(final) if token in eos), len(final))
    labels = [repr(tokenizer.decode([token]))[1:-1][:9] for token in final[:length]]
    columns = max(1, min(columns, length))
    rows = math.ceil(length / columns)
    num_steps = max(max(steps[:length]) + 1, 1)
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(0, max(num_steps - 1, 1))
    fig, (grid_ax, step_ax) = plt.subplots(
        2, 1, figsize=(max(7.0, columns * 0.8), rows * 0.5 + 3.6), gridspec_kw={"height_ratios": [rows * 0.5, 3]}
    )
    # top: the tokens coloured by commit step
    for index in range(length):
        row, col = divmod(index, columns)
        step = steps[index]
        color = cmap(norm(step)) if step >= 0 else (0.85, 0.85, 0.85, 1.0)
        grid_ax.add_patch(plt.Rectangle((col, -row - 1), 0.96, 0.9, color=color))
        dark = step >= 0 and norm(step) < 0.6
        grid_ax.text(col + 0.48, -row - 0.55, labels[index], ha="center", va="center", fontsize=7,
                     color="white" if dark else "black")  # fmt: skip
        grid_ax.text(col + 0.92, -row - 0.12, str(step), ha="right", va="top", fontsize=5,
                     color="white" if dark else "black")  # fmt: skip
        if block_size and (offset + index) % block_size == 0 and index > 0:
            grid_ax.plot([col - 0.02] * 2, [-row - 1.02, -row - 0.08], color="red", linewidth=1.5)
    grid_ax.set_xlim(0, columns)
    grid_ax.set_ylim(-rows, 0)
    grid_ax.axis("off")
    grid_ax.set_title(title + ("\n(red bars: block boundaries)" if block_size else ""), fontsize=9)
    # bottom: step against position
    positions = [index for index in range(length) if steps[index] >= 0]
    step_ax.plot([0, length - 1], [0, length - 1], color="0.75", linestyle="--", linewidth=1, label="one token/step")
    step_ax.scatter(positions, [steps[i] for i in positions], c=[steps[i] for i in positions], cmap=cmap, norm=norm,
                    s=18, zorder=3, label="committed token")  # fmt: skip
    step_ax.set_xlabel("answer position")
    step_ax.set_ylabel("denoising step")
    step_ax.set_xlim(-0.5, length - 0.5)
    step_ax.set_ylim(-0.5, max(num_steps, 1) - 0.5)
    step_ax.legend(loc="upper left", fontsize=7, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
