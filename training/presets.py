"""Domain presets: what `--domain pets|faces|tiny` fills in when a flag is not given.

A preset is a starting point from the paper and IP-Adapter practice (docs/ARCHITECTURE.md §6); every
value it sets is also a flag. M, the number of subject tokens, is stated once per preset: as its
Q-Former's `num_queries` (the core's name), read as `Preset.num_tokens` (the trainer's, as `--num_tokens`).
Phases: train at the first resolution, then continue at the second with
`--resolution 1024 --init_encoder <phase-1 export>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nested_attention import QFormerConfig

# File names ComfyUI users keep for these models (models/checkpoints, models/clip_vision).
SDXL_CHECKPOINT_NAMES = (
    "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors",
    "sdxl_base_1.0.safetensors",
)
CLIP_VISION_H_NAMES = (
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    "clip_vision_h.safetensors",
    "CLIP-ViT-H-14.safetensors",
    "clip-vit-h-14.safetensors",
)


@dataclass(frozen=True)
class Preset:
    domain: str  # name written into the encoder file
    token: str  # the subject word s* that captions' subject words become
    subject_words: tuple[str, ...]  # default --subject_words: caption words replaced by the token (singular)
    caption_template: str  # caption for images without one; "{token}" is the subject word
    resolutions: tuple[int, ...]  # training phases, in order
    center_crop: bool  # crop the target to a square at its centre (else at random)
    random_flip: bool  # mirror targets at random
    qformer: QFormerConfig = field(default_factory=QFormerConfig)  # the encoder's Q-Former, M included
    train_batch_size: int = 4  # per device (largest; lowered when the global batch needs it)
    # Global batch (all processes x accumulation) per phase, as the paper trained; () leaves it to the flags.
    global_batch_sizes: tuple[int, ...] = ()
    checkpoints_total_limit: int = 3  # checkpoint-N folders kept (about 6 GB each at SDXL size); 0 keeps all
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 500
    max_train_steps: int = 50_000
    checkpointing_steps: int = 2_000
    validation_steps: int = 2_000
    validation_prompts: tuple[str, ...] = ()
    mixed_precision: str | None = "bf16"
    gradient_checkpointing: bool = True
    sample_steps: int = 30
    tiny: bool = False  # tiny models built in code, generated data (CPU smoke runs)

    @property
    def num_tokens(self) -> int:
        """M, the subject tokens the Q-Former outputs (the default of --num_tokens)."""
        return self.qformer.num_queries


PRESETS: dict[str, Preset] = {
    "pets": Preset(
        domain="pets",
        token="pet",
        subject_words=(
            "pet", "animal", "dog", "puppy", "pup", "doggy", "doggo", "pooch", "hound", "cat", "kitten",
            "kitty", "bunny", "rabbit", "hamster", "bird", "parrot",
            # common dog and cat breed words, as captioners write them ("a golden retriever puppy")
            "retriever", "labrador", "poodle", "terrier", "beagle", "bulldog", "husky", "shepherd",
            "dachshund", "chihuahua", "pug", "corgi", "spaniel", "collie", "rottweiler", "shih tzu", "boxer",
            "shiba", "maltese", "pomeranian", "doberman", "schnauzer", "greyhound", "sheepdog", "samoyed",
            "akita", "malamute", "tabby", "siamese", "persian", "ragdoll", "sphynx", "maine coon", "bengal",
        ),
        caption_template="a photo of a {token}",
        resolutions=(512, 1024),
        center_crop=True,
        random_flip=True,
        qformer=QFormerConfig(num_queries=256),
        global_batch_sizes=(128, 32),  # paper: 8 GPUs, 128 at 512 px then 32 at 1024 px
        validation_prompts=(
            "a photo of a {token}",
            "a {token} on the beach",
            "a watercolor painting of a {token}",
            "a {token} wearing a red hat",
        ),
    ),
    "faces": Preset(
        domain="faces",
        token="person",
        subject_words=(
            # singular nouns only: "people", "women" are plurals (training.data.captions), "model" is ambiguous
            "person", "man", "woman", "boy", "girl", "child", "kid", "lady", "guy", "gentleman", "teenager",
            "teen", "adult", "baby", "toddler", "actor", "actress",
        ),
        caption_template="a photo of a {token}",
        resolutions=(512, 1024),
        center_crop=True,
        random_flip=True,
        qformer=QFormerConfig(num_queries=1024),
        global_batch_sizes=(32, 16),  # paper: 32 at 512 px (4 GPUs), 16 at 1024 px (8 GPUs)
        validation_prompts=(
            "a photo of a {token}",
            "a {token} as an astronaut",
            "an oil painting of a {token}",
            "a {token} smiling in a park",
        ),
    ),
    "tiny": Preset(
        domain="tiny",
        token="pet",
        subject_words=("pet",),
        caption_template="a photo of a {token}",
        resolutions=(64,),
        center_crop=True,
        random_flip=False,
        qformer=QFormerConfig(clip_dim=64, dim=64, depth=2, heads=4, dim_head=16, num_queries=16, ff_mult=2),
        train_batch_size=2,
        learning_rate=1e-3,
        lr_warmup_steps=5,
        max_train_steps=30,
        checkpointing_steps=15,
        validation_steps=30,
        validation_prompts=("a photo of a {token}", "a {token} in the snow"),
        mixed_precision="no",
        gradient_checkpointing=False,
        sample_steps=4,
        tiny=True,
    ),
}
