"""Prompt text -> per-step text-encoder conditioning, with A1111's chunking, emphasis and embeddings.

A prompt is split on AND; each part is scheduled (editing, alternation); each part's texts are
encoded together (A1111 encodes one prompt's schedule as one batch: emphasis restores the mean of
that batch), every distinct text once. Long prompts become 75-token chunks with their own start and
end tokens, concatenated.
"""
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .. import limits
from ..diffusion.denoiser import Cond, context_of
from .attention import parse_attention
from .extras import split_and
from .schedule import schedule

CHUNK = 75
COMMA_BACKTRACK = 20
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass
class Chunk:
    ids: list = field(default_factory=list)  # CHUNK + 2 token ids once closed
    weights: list = field(default_factory=list)
    fixes: list = field(default_factory=list)  # (offset in ids, Embedding)


def check_emphasis(emphasis):
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis {emphasis!r}: choose one of {', '.join(EMPHASIS_MODES)}")
    return emphasis


def tokenize_line(line, tokenizer, embeddings=None, emphasis="Original", backtrack=COMMA_BACKTRACK):
    """One prompt text -> [Chunk]: 75 tokens each plus start/end, split at BREAK, moved back to the
    last comma when the boundary falls within `backtrack` tokens of it, embeddings kept whole."""
    parsed = parse_attention(line) if emphasis != "None" else [(line, 1.0)]
    token_lists = tokenizer.encode_batch([text for text, _ in parsed])
    chunks, cur = [], Chunk()
    last_comma = -1

    def close(chunk):
        if len(chunks) == limits.MAX_PROMPT_CHUNKS:
            raise limits.LimitError(f"the prompt is longer than {limits.MAX_PROMPT_CHUNKS} chunks of {CHUNK} tokens "
                                    f"(BREAK starts a new chunk): shorten it")
        pad = CHUNK - len(chunk.ids)
        chunk.ids = [tokenizer.bos_id, *chunk.ids, *[tokenizer.eos_id] * pad, tokenizer.eos_id]
        chunk.weights = [1.0, *chunk.weights, *[1.0] * pad, 1.0]
        chunk.fixes = [(offset + 1, emb) for offset, emb in chunk.fixes]
        chunks.append(chunk)
        return Chunk()

    for ids, (text, weight) in zip(token_lists, parsed):
        if text == "BREAK" and weight == -1:
            cur, last_comma = close(cur), -1
            continue
        pos = 0
        while pos < len(ids):
            if ids[pos] == tokenizer.comma_id:
                last_comma = len(cur.ids)
            elif backtrack and len(cur.ids) == CHUNK and last_comma != -1 and CHUNK - last_comma <= backtrack:
                cut = last_comma + 1
                moved = Chunk(cur.ids[cut:], cur.weights[cut:], [(o - cut, e) for o, e in cur.fixes if o >= cut])
                cur.ids, cur.weights = cur.ids[:cut], cur.weights[:cut]
                cur.fixes = [(o, e) for o, e in cur.fixes if o < cut]
                close(cur)
                cur, last_comma = moved, -1
            if len(cur.ids) == CHUNK:
                cur, last_comma = close(cur), -1
            embedding, covered = embeddings.find_at(ids, pos) if embeddings else (None, 0)
            if embedding is None:
                cur.ids.append(ids[pos])
                cur.weights.append(weight)
                pos += 1
                continue
            n = embedding.num_vectors
            if len(cur.ids) + n > CHUNK:
                cur, last_comma = close(cur), -1
            cur.fixes.append((len(cur.ids), embedding))
            cur.ids += [0] * n
            cur.weights += [weight] * n
            pos += covered
    if cur.ids or not chunks:
        close(cur)
    return chunks


class PromptEncoder:
    """Texts -> [T, D] conditioning per text, A1111 style. Records the embeddings it used.

    embedding_part: which part of a multi-part embedding this encoder takes (SDXL: "clip_l" or "clip_g";
    None: one-tensor embeddings, SD 1.x/2.x)."""

    def __init__(self, tokenizer, text_encoder, embeddings=None, clip_skip=1, emphasis="Original", pooled=False,
                 embedding_part=None):
        self.tokenizer, self.text_encoder, self.embeddings = tokenizer, text_encoder, embeddings
        self.embedding_part = embedding_part
        self.clip_skip, self.emphasis = clip_skip, check_emphasis(emphasis)
        self.used = {}  # embedding name -> Embedding, in order of first use
        # pooled: also keep each text's pooled output, from its first chunk and before emphasis (A1111)
        self.pooled = {} if pooled else None
        self._empty = None

    def empty(self):
        """The encoded empty prompt [77, D]: what A1111 pads the shorter of cond/uncond with."""
        if self._empty is None:
            self._empty = self.encode_batch([""])[""]
        return self._empty

    def encode_batch(self, texts, negative=False):
        """texts (repeats allowed, as a schedule has them) -> {text: [77 * chunks, D]}.

        Texts with fewer chunks are padded with empty chunks; emphasis "Original" restores the mean of
        each chunk position over the whole batch, repeats counted, as A1111 does."""
        counts = Counter(texts)
        distinct = list(counts)
        per_text = [tokenize_line(t, self.tokenizer, self.embeddings, self.emphasis) for t in distinct]
        weights = np.array([counts[t] for t in distinct], np.float64)
        out = [[] for _ in distinct]
        for i in range(max(len(c) for c in per_text)):
            batch = [c[i] if i < len(c) else tokenize_line("", self.tokenizer)[0] for c in per_text]
            z = self._encode_chunks(batch)
            if self.pooled is not None:
                z, pooled = z
                if i == 0:
                    self.pooled.update(zip(distinct, pooled))
            for row, z_row in zip(out, self._emphasize(z, batch, weights)):
                row.append(z_row)
        return {t: np.concatenate(rows) for t, rows in zip(distinct, out)}

    def _encode_chunks(self, batch):
        tok = self.tokenizer
        ids = np.array([c.ids for c in batch], np.int64)
        if tok.eos_id != tok.pad_id:  # SD 2: pad id after the first end token
            for row in ids:
                row[int(np.argmax(row == tok.eos_id)) + 1:] = tok.pad_id
        embeds = self.text_encoder.embed(ids).astype(np.float32, copy=True)
        for b, chunk in enumerate(batch):
            for offset, embedding in chunk.fixes:
                vectors = embedding.vectors_for(self.embedding_part, embeds.shape[-1])
                n = min(len(vectors), embeds.shape[1] - offset - 1)
                embeds[b, offset:offset + n] = vectors[:n]
                self.used.setdefault(embedding.name, embedding)
        if self.pooled is not None:
            return self.text_encoder(ids, clip_skip=self.clip_skip, inputs_embeds=embeds, pooled=True)
        return self.text_encoder(ids, clip_skip=self.clip_skip, inputs_embeds=embeds)

    def _emphasize(self, z, batch, counts):
        if self.emphasis in ("Ignore", "None"):
            return z
        mult = np.array([c.weights for c in batch], np.float32)[..., None]
        weighted = z * mult
        if self.emphasis == "No norm":
            return weighted
        original, new = _mean(z, counts), _mean(weighted, counts)
        return weighted * np.float32(original / new)


def _mean(z, counts):
    return float(np.einsum("b,b->", z.astype(np.float64).mean(axis=(1, 2)), counts) / counts.sum())


class JointPromptEncoder:
    """Several PromptEncoders whose outputs are concatenated on the feature axis, each with its own
    chunking and emphasis as A1111 runs them (SDXL: CLIP-L then bigG). Texts encode to Cond entries that
    also carry the pooled output (the UNet's text_embeds) of the encoder that has one.

    zero_empty_negative: an all-empty negative prompt conditions as zeros, context and pooled (SDXL;
    A1111's force_zero_embeddings, diffusers' force_zeros_for_empty_prompt)."""

    def __init__(self, encoders, zero_empty_negative=False):
        self.encoders, self.zero_empty_negative = list(encoders), zero_empty_negative

    @property
    def used(self):
        return {name: e for encoder in self.encoders for name, e in encoder.used.items()}

    def empty(self):
        return np.concatenate([e.empty() for e in self.encoders], axis=-1)

    def encode_batch(self, texts, negative=False):
        per = [e.encode_batch(texts) for e in self.encoders]
        out = {}
        for text in per[0]:
            z = np.concatenate([p[text] for p in per], axis=-1)
            pooled = [e.pooled[text] for e in self.encoders if e.pooled is not None]  # SDXL: bigG's
            pooled = {"text_embeds": pooled[-1]} if pooled else {}
            if negative and self.zero_empty_negative and all(t == "" for t in texts):
                z, pooled = np.zeros_like(z), {k: np.zeros_like(v) for k, v in pooled.items()}
            out[text] = Cond(z, pooled)
        return out


@dataclass
class Conditioning:
    """Per-step conditioning: `at(step)` -> (uncond [T, D] or None, [(cond [T, D], weight)]).

    `step` counts denoiser calls from 0, as A1111's CFG denoiser does (a Heun step counts twice);
    an entry (end_step, z) applies while step <= end_step. An entry may be a Cond: the context [T, D]
    with the UNet's added inputs for it (SDXL's pooled text embeddings and time ids)."""
    parts: list  # [([(end_step, z)], weight)] for the AND parts of the prompt
    uncond: list = None  # [(end_step, z)]
    empty: np.ndarray = None

    def at(self, step):
        conds = [(_pick(sched, step), w) for sched, w in self.parts]
        length = max(context_of(z).shape[0] for z, _ in conds)
        conds = [(_on_context(z, lambda c: _repeat_last(c, length)), w) for z, w in conds]
        if self.uncond is None:
            return None, conds
        uncond = _pick(self.uncond, step)
        extra = (length - context_of(uncond).shape[0]) // self.empty.shape[0]
        if extra > 0:
            uncond = _on_context(uncond, lambda c: np.concatenate([c, *[self.empty] * extra]))
        elif extra < 0:
            conds = [(_on_context(z, lambda c: np.concatenate([c, *[self.empty] * -extra])), w) for z, w in conds]
        return uncond, conds

    def with_added(self, cond, uncond=None):
        """A copy whose entries also carry these UNet inputs ({name: per-image vector}, e.g. time_ids);
        the negative prompt's get `uncond`, or `cond` when that is None."""
        def add(sched, extra):
            return [(end, Cond(context_of(z), {**getattr(z, "added", {}), **extra})) for end, z in sched]

        uncond_sched = add(self.uncond, cond if uncond is None else uncond) if self.uncond is not None else None
        return Conditioning([(add(sched, cond), w) for sched, w in self.parts], uncond_sched, self.empty)


def _on_context(z, fn):
    return Cond(fn(z.context), z.added) if isinstance(z, Cond) else fn(z)


def _pick(sched, step):
    for end, z in sched:
        if step <= end:
            return z
    return sched[0][1]  # past the last end step (more calls than steps): A1111 falls back to the first


def _repeat_last(z, length):
    return z if z.shape[0] == length else np.concatenate([z, np.repeat(z[-1:], length - z.shape[0], axis=0)])


def encode_prompt(encoder, prompt, negative_prompt, steps, guidance=True, first_pass_steps=None):
    """Positive (AND parts with weights) and negative prompt -> Conditioning.

    steps: the model calls to schedule over (`SamplerInfo.total_steps`); first_pass_steps: for a hires
    pass, the first pass's (see `schedule`). The negative prompt is encoded when guidance is on or the
    positive prompt composes parts."""
    parts = []
    sub_prompts = split_and(prompt)
    if len(sub_prompts) > limits.MAX_PROMPT_PARTS:
        raise limits.LimitError(f"the prompt has {len(sub_prompts)} AND parts, over the limit of "
                                f"{limits.MAX_PROMPT_PARTS} (each is one more UNet conditioning)")
    for text, weight in sub_prompts:
        sched = schedule(text, steps, first_pass_steps)
        z = encoder.encode_batch([t for _, t in sched])
        parts.append(([(end, z[t]) for end, t in sched], weight))
    composed = len(parts) > 1 or parts[0][1] != 1.0
    uncond = None
    if guidance or composed:
        sched = schedule(negative_prompt, steps, first_pass_steps)
        z = encoder.encode_batch([t for _, t in sched], negative=True)
        uncond = [(end, z[t]) for end, t in sched]
    return Conditioning(parts, uncond, encoder.empty() if uncond is not None else None)
