"""SDXL prompts read past CLIP's 77 tokens, and weighted words (a model's `prompts`).

CLIP reads 77 tokens: a start token, 75 of the prompt's and an end token, padded. diffusers
(and Replicate's SDXL) cut a longer prompt there. With `prompts.chunks` above 1, a prompt
is read as AUTOMATIC1111's WebUI and compel read it: its tokens in chunks of 75, each chunk
encoded on its own as a 77-token prompt, and the chunks' embeddings joined along the
sequence, so the UNet's cross-attention sees every word; the pooled embedding is the first
chunk's. A chunk that would end within `comma_backtrack` tokens after a comma ends after the
comma instead, the words after it starting the next chunk (the WebUI's way, 20 by default),
so a phrase is not split between chunks. A prompt and its negative prompt are padded to the
same count with empty chunks; requests of other counts share a call with their padding
masked (`prompt_masks`). A prompt of one chunk is encoded exactly as diffusers encodes it.

With `prompts.weights`, AUTOMATIC1111's emphasis: `(words)` weighs 1.1, `[words]` 1/1.1,
`(words:1.5)` 1.5, nested groups multiply, `\\(` `\\)` `\\[` `\\]` are literal brackets. Each
token's embedding is scaled by its weight, then each chunk's embeddings are scaled back to
their unweighted mean. The pooled embedding is not weighted. `BREAK` (the word, in
capitals) ends a chunk early: what follows starts the next one (brackets do not reach
across it).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

# (tokenizer, text encoder) pairs, in the order their embeddings are joined.
Encoders = Sequence[tuple[object, torch.nn.Module]]

EMPHASIS = 1.1
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# A chunk's token ids (no start or end token) and their weights.
Chunk = tuple[list[int], list[float]]
_SYNTAX = re.compile(r"\\[\\()\[\]]|\(|\[|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\)|\]"
                     r"|[^\\()\[\]:]+|[\\:]")


def weighted_pieces(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces under AUTOMATIC1111's emphasis syntax,
    neighbours of one weight joined. Brackets left open weigh to the end; a closing one
    with nothing open is text."""
    pieces: list[list] = []
    rounds: list[int] = []  # where each open group's pieces start
    squares: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if len(text) == 2 and text[0] == "\\":
            pieces.append([text[1], 1.0])
        elif text in "([":
            (rounds if text == "(" else squares).append(len(pieces))
        elif weight is not None and rounds:
            weigh(rounds.pop(), float(weight))
        elif text == ")" and rounds:
            weigh(rounds.pop(), EMPHASIS)
        elif text == "]" and squares:
            weigh(squares.pop(), 1 / EMPHASIS)
        else:
            pieces.append([text, 1.0])
    for start in rounds:
        weigh(start, EMPHASIS)
    for start in squares:
        weigh(start, 1 / EMPHASIS)
    joined: list[tuple[str, float]] = []
    for text, weight in pieces:
        if joined and joined[-1][1] == weight:
            text = joined.pop()[0] + text
        joined.append((text, weight))
    return joined or [("", 1.0)]


class LongPrompts:
    """Tokenizes and encodes prompts in chunks for a pipeline's tokenizers. `convert`
    spells a textual inversion's token as its vectors' tokens (diffusers'
    `maybe_convert_prompt`). Safe from several threads: a tokenizer is used by one at a
    time (fast tokenizers refuse concurrent use)."""

    def __init__(self, tokenizers: Sequence, chunks: int = 1, weights: bool = False,
                 comma_backtrack: int = 20,
                 convert: Callable[[str, object], str] = lambda text, tokenizer: text):
        if chunks < 1 or comma_backtrack < 0:
            raise ValueError("chunks must be >= 1 and comma_backtrack >= 0")
        self.tokenizers, self.chunks, self.weights = tuple(tokenizers), chunks, weights
        self.comma_backtrack = comma_backtrack if chunks > 1 else 0
        self._convert = convert
        self._lock = threading.RLock()
        self._counts: OrderedDict[tuple[str, str], int] = OrderedDict()

    def count(self, prompt: str, negative_prompt: str) -> int:
        """How many chunks the prompt and its negative prompt are encoded in (the larger
        count; 1 when a model reads one)."""
        if self.chunks == 1:
            return 1
        with self._lock:
            key = (prompt, negative_prompt)
            if key not in self._counts:
                self._counts[key] = max(len(self._tokens(t, text))
                                        for t in self.tokenizers for text in key)
                if len(self._counts) > 256:
                    self._counts.popitem(last=False)
            self._counts.move_to_end(key)
            return self._counts[key]

    def notes(self, prompt: str, negative_prompt: str) -> tuple[str, ...]:
        """For each of the two that is longer than what the model reads, a line saying
        how much of it is read."""
        tokenizer, said = self.tokenizers[0], []
        with self._lock:
            for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
                chunks = self._tokens(tokenizer, text, cut=False)
                whole = sum(len(ids) for ids, _ in chunks)
                read = sum(len(ids) for ids, _ in chunks[:self.chunks])
                if read < whole:
                    said.append(f"{field}: the model reads {read} of its {whole} tokens "
                                f"({self.chunks} chunk(s) of {_size(tokenizer)}); the rest "
                                "was not read")
        return tuple(said)

    def _tokens(self, tokenizer, text: str, cut: bool = True) -> list[Chunk]:
        """The text's chunks (at least one), up to the count read unless not `cut`."""
        segments = _BREAK.split(text) if self.weights else [text]
        size, chunks = _size(tokenizer), []
        most = self.chunks * size if cut else 10**9
        comma = _comma(tokenizer) if self.comma_backtrack else None
        for segment in segments:
            pieces = weighted_pieces(segment) if self.weights else [(segment, 1.0)]
            ids: list[int] = []
            weights: list[float] = []
            for piece, weight in pieces:
                piece_ids = tokenizer(self._convert(piece, tokenizer), add_special_tokens=False,
                                      truncation=cut, max_length=most).input_ids
                ids += piece_ids
                weights += [weight] * len(piece_ids)
            chunks += _split(ids, weights, size, comma, self.comma_backtrack)
        return chunks[:self.chunks] if cut else chunks

    @torch.inference_mode()
    def encode(self, encoders: Encoders, prompt: str, negative_prompt: str,
               zeros_for_empty: bool, device: torch.device, dtype: torch.dtype,
               clip_skip: int = 0) -> tuple[torch.Tensor, ...]:
        """(prompt embeddings, negative ones, pooled, negative pooled), each with a batch
        dimension of 1, as diffusers' SDXL `encode_prompt` gives them for one image with
        guidance and `clip_skip`; an empty negative prompt gives zeros where the model
        says so (`force_zeros_for_empty_prompt`)."""
        zeros = zeros_for_empty and not negative_prompt
        with self._lock:  # the tokenizers; not the encoders (`count` may wait on it)
            count = self.count(prompt, negative_prompt)
            tokens = [[self._chunked(t, self._tokens(t, text), count) for t, _ in encoders]
                      for text in ((prompt,) if zeros else (prompt, negative_prompt))]
        pos, pooled = self._encoded(encoders, tokens[0], clip_skip)
        if zeros:
            neg, neg_pooled = torch.zeros_like(pos), torch.zeros_like(pooled)
        else:
            neg, neg_pooled = self._encoded(encoders, tokens[1], clip_skip)
        return tuple(t.to(device=device, dtype=dtype) for t in (pos, neg, pooled, neg_pooled))

    @staticmethod
    def _encoded(encoders: Encoders, tokens: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A text's embeddings from its chunks' tokens and weights for each encoder: each
        encoder's hidden states `clip_skip` layers before its penultimate for every chunk,
        chunks joined along the sequence, encoders along the features; and the pooled
        embedding of the first encoder that has one, from the first chunk (its last
        layer's, whatever the layer read)."""
        embeds, pooled = [], None
        for (_, encoder), (ids, weights) in zip(encoders, tokens, strict=True):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0][:1]
            hidden = out.hidden_states[-(clip_skip + 2)]
            if bool((weights != 1).any()):
                hidden = _weighted(hidden, weights.to(hidden))
            embeds.append(hidden.reshape(1, -1, hidden.shape[-1]))
        return torch.cat(embeds, dim=-1), pooled

    @staticmethod
    def _chunked(tokenizer, chunks: Sequence[Chunk],
                 count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(count, 77) token ids, each row a chunk's: a start token, its ids, an end token
        and padding (empty chunks after the text's), and their weights (1 for the added
        tokens)."""
        size = _size(tokenizer)
        rows, row_weights = [], []
        for ids, weights in [*chunks, *[([], [])] * (count - len(chunks))]:
            pad = size - len(ids)
            rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
                        + [tokenizer.pad_token_id] * pad)
            row_weights.append([1.0, *weights, 1.0] + [1.0] * pad)
        return torch.tensor(rows), torch.tensor(row_weights)


def _size(tokenizer) -> int:
    """The prompt tokens one chunk holds (75 for CLIP's 77)."""
    return tokenizer.model_max_length - 2


def _comma(tokenizer) -> int | None:
    """The id of a comma ending a word, None if the tokenizer spells it otherwise."""
    ids = tokenizer(",", add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def _split(ids: list[int], weights: list[float], size: int, comma: int | None,
           backtrack: int) -> list[Chunk]:
    """The tokens in chunks of `size` (at least one chunk), as the WebUI splits them: when
    a chunk is full and the next token is not a comma, a comma among its last `backtrack`
    tokens ends it instead, the tokens after the comma moving to the next chunk."""
    chunks: list[Chunk] = []
    while len(ids) > size:
        cut = size
        if comma is not None and ids[size] != comma:
            commas = [i for i in range(max(size - backtrack, 0), size) if ids[i] == comma]
            cut = commas[-1] + 1 if commas else size
        chunks.append((ids[:cut], weights[:cut]))
        ids, weights = ids[cut:], weights[cut:]
    return [*chunks, (ids, weights)]


def _weighted(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's embedding scaled by its weight, each chunk then scaled back to its
    unweighted mean (AUTOMATIC1111's emphasis)."""
    before = hidden.mean(dim=(1, 2), keepdim=True)
    hidden = hidden * weights.unsqueeze(-1)
    return hidden * (before / hidden.mean(dim=(1, 2), keepdim=True))
