"""Token id layout, derived from the tokenizer and the model config (never hard-coded)."""

from __future__ import annotations

from dataclasses import dataclass

PAD = -1  # an empty cell of a multi-codebook row; embeds to zero


@dataclass(frozen=True)
class TokenLayout:
    """Where text, audio codebooks, markers and control ids sit in the vocabulary."""

    audio_offset: int  # first audio id = number of text ids (128256 for Llama-3.1)
    codebook_size: int  # 1024
    num_quantizers: int  # 64
    bos_id: int
    end_of_song_id: int  # <|end_of_text|>
    no_use_id: int  # <|finetune_right_pad_id|>: what a pad cell is looked up as

    def layer_start(self, layer: int) -> int:
        return self.audio_offset + layer * self.codebook_size

    def layer_range(self, layer: int) -> tuple[int, int]:
        start = self.layer_start(layer)
        return start, start + self.codebook_size

    def marker_id(self, layer: int) -> int:
        """Id placed on the last prompt row during the super-res pass filling `layer`."""
        return self.audio_offset - 1 - layer

    @property
    def backbone_vocab(self) -> int:
        """Ids the backbone can emit: text plus the q0 and q1 codebooks."""
        return self.layer_start(2)

    @property
    def superres_vocab(self) -> int:
        return self.layer_start(self.num_quantizers)

    @classmethod
    def from_tokenizer(cls, tokenizer, num_quantizers: int, codebook_size: int) -> TokenLayout:
        """Layout for a `tokenizers.Tokenizer` (or anything with get_vocab_size/token_to_id)."""

        def tid(name: str) -> int:
            i = tokenizer.token_to_id(name)
            if i is None:
                raise ValueError(f"tokenizer has no {name} token")
            return int(i)

        layout = cls(
            audio_offset=int(tokenizer.get_vocab_size(with_added_tokens=True)),
            codebook_size=codebook_size,
            num_quantizers=num_quantizers,
            bos_id=tid("<|begin_of_text|>"),
            end_of_song_id=tid("<|end_of_text|>"),
            no_use_id=tid("<|finetune_right_pad_id|>"),
        )
        if layout.marker_id(num_quantizers - 1) < 0:
            raise ValueError("vocabulary too small for the super-res layer markers")
        return layout
