"""Prompt templates, tokenisation with label masking, and batch collation."""

from __future__ import annotations

from typing import Any

import torch

from fedhmoe.data.types import Example

__all__ = ["ALPACA_TEMPLATE", "IGNORE_INDEX", "PromptFormatter"]

IGNORE_INDEX = -100
ALPACA_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
_SENTINEL = "\u2063fedhmoe-answer\u2063"


class PromptFormatter:
    """Turns :class:`Example` objects into token ids for training, generation and choice scoring.

    Decoder-only models (the default): prompt and answer are tokenised separately and concatenated,
    so the answer's tokens (and only they) carry labels. The ``chat`` template renders the
    tokenizer's chat template with ``add_generation_prompt=True`` and tokenises it without adding
    special tokens (the template already holds any BOS). The ``alpaca`` template prepends the BOS
    token only when the tokenizer adds one to plain text by itself.

    Encoder-decoder models (``encoder_decoder=True``): an item is (encoder input ids, decoder labels).
    The encoder input is the ``alpaca`` prompt (there is no chat template; ``auto`` means ``alpaca``)
    tokenised with the tokenizer's own special tokens (e.g. T5's trailing ``</s>``) and cut on the left
    to ``max_seq_len``; the labels are the answer's ids followed by EOS, cut on the right to
    ``max_seq_len``. The model shifts the labels right to make the decoder inputs.

    Args:
        tokenizer: A Hugging Face tokenizer.
        template: ``chat``, ``alpaca`` or ``auto`` (chat when the tokenizer has a chat template and the
            model is decoder-only).
        system_prompt: Optional system message (chat) or preamble (alpaca).
        max_seq_len: Longest encoded sequence (decoder-only: prompt + answer; encoder-decoder: each of
            the encoder input and the labels).
        encoder_decoder: Whether the model is an encoder-decoder (``model.config.is_encoder_decoder``).
    """

    def __init__(self, tokenizer: Any, template: str = "auto", system_prompt: str = "", max_seq_len: int = 256,
                 encoder_decoder: bool = False):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "auto":
            template = "chat" if has_chat and not encoder_decoder else "alpaca"
        if template not in ("chat", "alpaca"):
            raise ValueError(f"unknown prompt template {template!r}; expected auto, chat or alpaca")
        if template == "chat" and encoder_decoder:
            raise ValueError("prompt template 'chat' is for decoder-only models; an encoder-decoder model takes "
                             "'alpaca' (or 'auto')")
        if template == "chat" and not has_chat:
            raise ValueError("prompt template 'chat' needs a tokenizer with a chat_template; use 'alpaca'")
        if encoder_decoder and tokenizer.eos_token_id is None:
            raise ValueError("an encoder-decoder model needs a tokenizer with an eos token to end its answers")
        self.tokenizer = tokenizer
        self.template = template
        self.encoder_decoder = encoder_decoder
        self.system_prompt = system_prompt
        self.max_seq_len = max_seq_len
        self.eos_text: str = tokenizer.eos_token or ""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.pad_id: int = int(pad)
        self.eos_id: int | None = tokenizer.eos_token_id
        self.bos_id: int | None = tokenizer.bos_token_id
        self._alpaca_bos = False
        if template == "alpaca" and self.bos_id is not None:
            probe = self._ids("a", special=True)
            self._alpaca_bos = bool(probe) and probe[0] == self.bos_id
        self._chat_tail: str | None = None

    # ---------------------------------------------------------------------------------------------
    # text

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )
        return text if isinstance(text, str) else str(text)

    def prompt_text(self, ex: Example) -> str:
        """Everything before the answer: the templated prompt, ending where the answer starts."""
        if self.template == "chat":
            return self._render(self._messages(ex.prompt), True)
        pre = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        return pre + ALPACA_TEMPLATE.format(prompt=ex.prompt)

    def _tail(self) -> str:
        """What follows the answer: the chat template's end of an assistant turn, ending with EOS."""
        if self.template == "alpaca":
            return self.eos_text
        if self._chat_tail is None:
            tail = self.eos_text
            try:
                probe = "Say something."
                head = self._render(self._messages(probe), True)
                full = self._render(
                    self._messages(probe) + [{"role": "assistant", "content": _SENTINEL}], False
                )
                if full.startswith(head) and _SENTINEL in full[len(head):]:
                    after = full[len(head):].split(_SENTINEL, 1)[1].rstrip()
                    tail = after if after else self.eos_text
            except Exception:  # templates may reject the probe conversation
                tail = self.eos_text
            if self.eos_text and self.eos_text not in tail:
                tail += self.eos_text
            self._chat_tail = tail
        return self._chat_tail

    def answer_text(self, ex: Example) -> str:
        """The answer followed by the end-of-turn text (always containing the EOS token)."""
        return ex.answer + self._tail()

    # ---------------------------------------------------------------------------------------------
    # ids

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _prompt_ids(self, ex: Example) -> list[int]:
        if self.encoder_decoder:  # the encoder input in the tokenizer's own format
            return self._ids(self.prompt_text(ex), special=True)
        ids = self._ids(self.prompt_text(ex))
        if self._alpaca_bos:
            ids = [self.bos_id] + ids  # type: ignore[list-item]
        return ids

    def _cut_left(self, ids: list[int], room: int) -> list[int]:
        """Keep the last ``room`` ids (and a leading BOS when there is room for it)."""
        if len(ids) <= room:
            return ids
        if room <= 0:
            return []
        if self.bos_id is not None and ids[0] == self.bos_id and room >= 2:
            return ids[:1] + ids[len(ids) - room + 1 :]
        return ids[len(ids) - room :]

    def _fit(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        limit = self.max_seq_len
        if len(prompt) + len(answer) <= limit:
            return prompt, answer
        if len(answer) > limit:
            # The answer alone is too long: cut it on the right, keeping the end of the prompt
            # (up to a quarter of the budget) so the example stays conditioned on it.
            answer = answer[: limit - min(len(prompt), limit // 4)]
        return self._cut_left(prompt, limit - len(answer)), answer

    @staticmethod
    def _pair(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + list(answer)

    def _encoder_ids(self, ex: Example) -> list[int]:
        """Encoder-decoder: the encoder input, cut on the left to ``max_seq_len``."""
        return self._cut_left(self._prompt_ids(ex), self.max_seq_len)

    def encode_train(self, ex: Example) -> tuple[list[int], list[int]]:
        """Token ids and labels for training.

        Decoder-only: one sequence, labels -100 on the prompt. If prompt + answer exceed ``max_seq_len``
        the prompt is cut on the left; an answer longer than ``max_seq_len`` by itself is cut on the
        right. Encoder-decoder: the encoder input ids and the decoder labels (answer + EOS), each cut to
        ``max_seq_len`` (the prompt on the left, the labels on the right).
        """
        if self.encoder_decoder:
            labels = self._ids(ex.answer) + [int(self.eos_id)]  # type: ignore[arg-type]
            return self._encoder_ids(ex), labels[: self.max_seq_len]
        prompt, answer = self._fit(self._prompt_ids(ex), self._ids(self.answer_text(ex)))
        return self._pair(prompt, answer)

    def encode_prompt(self, ex: Example) -> list[int]:
        """Prompt ids for generation, cut on the left to ``max_seq_len - 1`` (encoder-decoder: the encoder
        input, cut to ``max_seq_len``)."""
        if self.encoder_decoder:
            return self._encoder_ids(ex)
        return self._cut_left(self._prompt_ids(ex), self.max_seq_len - 1)

    def encode_choices(self, ex: Example) -> list[tuple[list[int], list[int]]]:
        """One (input_ids, labels) pair per choice, labels only on the choice's tokens.

        All choices share the same prompt ids, truncated so that the longest choice fits
        (encoder-decoder: the encoder input, with each choice's ids as labels, no EOS, cut to
        ``max_seq_len``).

        Raises:
            ValueError: If the example has no choices.
        """
        if not ex.choices:
            raise ValueError(f"example {ex.uid or ex.task!r} has no choices")
        options = [self._ids(choice) for choice in ex.choices]
        if self.encoder_decoder:
            prompt = self._encoder_ids(ex)
            return [(prompt, option[: self.max_seq_len]) for option in options]
        longest = max(options, key=len)
        prompt, kept = self._fit(self._prompt_ids(ex), longest)  # one shared context for every choice
        return [self._pair(prompt, option[: len(kept)]) for option in options]

    # ---------------------------------------------------------------------------------------------
    # batches

    def collate_train(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad (input_ids, labels) pairs into ``input_ids``, ``attention_mask`` and ``labels``
        (encoder-decoder: also ``decoder_attention_mask``, see :meth:`_collate_seq2seq`)."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        if self.encoder_decoder:
            return self._collate_seq2seq(items)
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(items):
            if len(ids) != len(labs):
                raise ValueError(f"item {row}: {len(ids)} input ids but {len(labs)} labels")
            n = len(ids)
            input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(labs, dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _collate_seq2seq(self, items: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad (encoder ids, labels) pairs of an encoder-decoder model, each stream to its own width.

        Returns:
            ``input_ids`` and ``attention_mask`` ``(B, S)`` (encoder, pad id / 0 after each input),
            ``labels`` and ``decoder_attention_mask`` ``(B, T)`` (-100 / 0 after each label sequence;
            ``T`` is at least 1).
        """
        enc_width = max(len(ids) for ids, _ in items)
        dec_width = max(1, max(len(labs) for _, labs in items))
        input_ids = torch.full((len(items), enc_width), self.pad_id, dtype=torch.long)  # (B, S)
        mask = torch.zeros((len(items), enc_width), dtype=torch.long)  # (B, S)
        labels = torch.full((len(items), dec_width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        dec_mask = torch.zeros((len(items), dec_width), dtype=torch.long)  # (B, T)
        for row, (ids, labs) in enumerate(items):
            n, m = len(ids), len(labs)
            input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
            mask[row, :n] = 1
            labels[row, :m] = torch.tensor(labs, dtype=torch.long)
            dec_mask[row, :m] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "decoder_attention_mask": dec_mask}

    def collate_prompts(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad prompts for batched generation into ``input_ids`` and ``attention_mask`` ``(B, S)``: on the
        left for a decoder-only model (generation continues the prompt), on the right for an
        encoder-decoder (the prompts are encoder inputs; the decoder starts afresh)."""
        if not prompts:
            raise ValueError("cannot collate an empty batch")
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, S)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, S)
        for row, ids in enumerate(prompts):
            n = len(ids)
            if n:
                start = 0 if self.encoder_decoder else width - n
                input_ids[row, start : start + n] = torch.tensor(ids, dtype=torch.long)
                mask[row, start : start + n] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
