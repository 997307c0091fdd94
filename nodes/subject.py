"""Encode Subject Image(s), and saving / loading an encoded subject so it can be reused without the photos."""

from __future__ import annotations

import hashlib
import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io
from safetensors import SafetensorError, safe_open

from nested_attention import NestedEncoder, concat_subject_tokens, faces
from nested_attention.encoder import encode_clip_tokens
from nested_attention.formats import FLOAT_DTYPES, count_non_finite, file_problem
from nested_attention.images import (
    BLANK_SHARE,
    MASK_MARKS,
    MASK_RULE,
    blank_images,
    composite_on_white,
    subject_mask,
)
from nested_attention.logs import LOG_PREFIX
from nested_attention.weights import write_safetensors
from nested_attention_comfy.clip_vision import clip_vision_tokens

from .wires import (
    CATEGORY,
    EncoderHandle,
    NestedEncoderType,
    NestedSubjectType,
    Subject,
    choice_error,
    names_the_node,
)

SUBJECT_FORMAT = "nested-attention-subject"
SUBJECT_FORMAT_VERSION = 1
SUBJECT_DIR = "nested_attention_subjects"  # under ComfyUI's output (saving) and input/output (loading)
CLIP_PIXELS = 16 * 1024 * 1024  # photo pixels per CLIP vision call when encoding (16 photos of 1024 x 1024)
CROPS = ("center", "none")  # Encode Subject Image(s)' crop: center crop, or squash the whole photo
ALIGNS = ("auto", "off")  # its align: as the encoder was trained, or the photos as they are
log = logging.getLogger(__name__)


class SubjectError(ValueError):
    """Bad images, masks or subject files; the message says what to do."""


def subject_images(
    handle: EncoderHandle,
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    align: str = "auto",
    face_index: int = 0,
    mask_marks: str = "auto",
) -> torch.Tensor:
    """The photos as the encoder should see them: on white outside the subject (the mask read by `mask_marks`,
    nested_attention.images.MASK_RULE), then aligned FFHQ-style when the encoder's config asks for aligned faces
    (align "auto") -> (n, H, W, 3); "off" skips the alignment. Blank photos are refused (`check_not_blank`)."""
    if image is None or image.dim() != 4 or image.shape[0] == 0:
        return image  # encode_subject says what is wrong
    check_not_blank(image)
    keep, sides = subject_mask(mask, mask_marks)
    if mask is not None:
        log.info(
            "%s Encode Subject Image(s): mask_marks %s; the mask's 1 read as %s", LOG_PREFIX, mask_marks,
            ", ".join(f"image {i}: {side or 'nothing (mask ignored)'}" for i, side in enumerate(sides)),
        )
    images = composite_on_white(image, keep)
    if keep is not None:
        check_not_blank(images, mask_marks=mask_marks, sides=sides)
    config = handle.config
    if align == "off" or config.face_align == faces.ALIGN_NONE:
        return images
    if align != "auto":
        raise SubjectError(f"align is {align!r}; expected 'auto' (as the encoder was trained) or 'off'.")
    faces.check_align_mode(config.face_align)
    n = images.shape[0]
    progress = comfy.utils.ProgressBar(n)
    crops = []
    for i in range(n):
        try:
            crops.append(
                faces.align_face(
                    images[i].cpu(), size=config.face_size, face_index=face_index,
                    name=f"image {i} of the batch (counting from 0)",
                ).image
            )
        except faces.FaceAlignError as e:
            raise SubjectError(
                f"encoder {handle.name} reads aligned faces, and {e}"
            ) from e
        progress.update(1)
    return torch.stack(crops).to(images.device)  # (n, face_size, face_size, 3)


def check_not_blank(images: torch.Tensor, mask_marks: str | None = None, sides: list | None = None) -> None:
    """Refuse photos with (almost) nothing in them, naming the likely cause; with `sides`, the photos after the
    mask was applied (so the mask is the cause)."""
    blank = blank_images(images)
    if not blank:
        return
    which = ", ".join(str(i) for i in blank)
    where = f"image{'s' if len(blank) > 1 else ''} {which} of the batch (counting from 0)"
    colour = [round(float(c) * 255) for c in images[blank[0]].reshape(-1, images.shape[-1]).median(dim=0).values]
    share = f"at least {BLANK_SHARE:.0%} of the pixels are one colour, RGB {tuple(colour[:3])}"
    if sides is not None:
        read = sides[blank[0]] if len(sides) > blank[0] else sides[0]
        raise SubjectError(
            f"Encode Subject Image(s): the mask leaves almost nothing of {where} ({share} after the part outside "
            f"the subject was made white; mask_marks {mask_marks!r} read the mask's 1 as the {read}). Check that "
            "the mask covers the subject, or set mask_marks to the other side: 'subject' for a segmentation mask "
            "(1 on the object), 'background' for Load Image's MASK of a cut-out (1 on the transparent part)."
        )
    if min(colour) >= 250:
        cause = (
            "The likely cause: a 16-bit PNG through ComfyUI's Load Image, which some releases (0.3.75 among "
            "them) read as pure white. Save the photo as an 8-bit PNG or a JPEG and load it again."
        )
    else:
        cause = "Check the node that made it (a failed generation or conversion gives a plain image)."
    raise SubjectError(
        f"Encode Subject Image(s): {where} is blank ({share}): there is no subject in it to encode. {cause}"
    )


@torch.no_grad()
def encode_subject(
    handle: EncoderHandle, image: torch.Tensor, mask: torch.Tensor | None = None, crop: bool = True
) -> Subject:
    """Photos of one subject -> its tokens E (1, n*M, C): each photo encoded, the tokens concatenated."""
    if image is None or image.dim() != 4 or image.shape[0] == 0:
        shape = None if image is None else tuple(image.shape)
        raise SubjectError(
            f"no image (shape {shape}); connect one or more photos of the "
            "subject (an IMAGE batch)."
        )
    images = composite_on_white(image, mask)
    n = images.shape[0]
    spec = handle.config.clip_vision
    if crop != (spec.crop == "center"):
        log.warning(
            "%s encoder %s was trained with crop '%s'; encoding with crop '%s' instead",
            LOG_PREFIX, handle.name, spec.crop, "center" if crop else "none",
        )
    progress = comfy.utils.ProgressBar(n + 1)

    # The photos go through CLIP together, CLIP_PIXELS at a time: each call reads the tower's weights (and on
    # a CPU casts them from float16) once for all its photos, while the full-size photos a call moves to the
    # device stay bounded.
    per_call = max(1, CLIP_PIXELS // (images.shape[1] * images.shape[2]))
    hidden = []
    for start in range(0, n, per_call):
        out = clip_vision_tokens(handle.clip_vision, spec, images[start : start + per_call], crop=crop,
                                 encoder_name=handle.name)  # (photos, L, width)
        hidden.append(out)
        progress.update(out.shape[0])

    comfy.model_management.load_model_gpu(handle.patcher)
    tokens = concat_subject_tokens(encode_clip_tokens(handle.encoder, torch.cat(hidden)))  # (1, n*M, C)
    progress.update(1)
    name = f"{handle.config.domain} subject"
    return Subject(tokens=tokens, encoder=handle, name=name, images=n, photos=display_copy(images),
                   clip_tokens=torch.cat(hidden), crop=crop)


def display_copy(images: torch.Tensor, side: int = 512) -> torch.Tensor:
    """The photos kept for drawing the attention maps on: CPU float32, at most `side` pixels on the long side."""
    images = images.detach().to("cpu", torch.float32)
    scale = side / max(images.shape[1:3])
    if scale >= 1:
        return images
    size = (max(1, round(images.shape[1] * scale)), max(1, round(images.shape[2] * scale)))
    return torch.nn.functional.interpolate(images.movedim(-1, 1), size=size, mode="bilinear", antialias=True,
                                           align_corners=False).movedim(1, -1).clamp(0, 1)


class NestedAttentionEncodeSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionEncodeSubject",
            display_name="Encode Subject Image(s)",
            category=CATEGORY,
            description="Encodes one or more photos of ONE subject into subject tokens. Several photos of "
            "the same subject are combined; photos of different subjects mix their identities.",
            inputs=[
                NestedEncoderType.Input("encoder", tooltip="From Load Nested Encoder."),
                io.Image.Input(
                    "image",
                    tooltip="Photos of one subject (a batch). Each is encoded and the tokens are "
                    "concatenated; two different people in one batch mix their identities.",
                ),
                io.Combo.Input(
                    "crop",
                    options=list(CROPS),
                    default="center",
                    tooltip="How photos are fitted to the CLIP vision input: center crop, or squash the "
                    "whole photo.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Isolates the subject: outside it the photo is replaced by white, as the encoder "
                    "was trained (pets on a white background). One mask, or one per photo. Load Image's MASK "
                    "of a cut-out and a segmentation mask both work as they are: mask_marks says how the side "
                    "that is the subject is chosen. The encoded_images output shows the result.",
                ),
                io.Combo.Input(
                    "align",
                    options=list(ALIGNS),
                    default="auto",
                    optional=True,
                    tooltip="auto: when the encoder was trained on aligned faces (face encoders), find the "
                    "face and crop it with the eyes and mouth where training put them. off: encode the "
                    "photos as they are.",
                ),
                io.Int.Input(
                    "face_index",
                    default=0,
                    min=0,
                    max=63,
                    optional=True,
                    tooltip="Which face to use when a photo shows several: 0 is the largest, 1 the next. See "
                    "the encoded_images output.",
                ),
                # Last, so that the widget values of workflows saved before it existed keep their places.
                io.Combo.Input(
                    "mask_marks",
                    options=list(MASK_MARKS),
                    default="auto",
                    optional=True,
                    tooltip="What the mask's white (1) marks. Load Image gives 1 on the transparent background "
                    "of a cut-out (1 - alpha); segmentation nodes give 1 on the object. " + MASK_RULE
                    + " Check the encoded_images output: the subject on white.",
                ),
            ],
            outputs=[
                NestedSubjectType.Output(
                    "subject", display_name="subject", tooltip="The subject, for Apply Nested Attention."
                ),
                io.Image.Output(
                    "encoded_images",
                    display_name="encoded_images",
                    tooltip="The images the encoder read (aligned face crops, white outside the subject), to "
                    "check them: with a mask, the subject must be on white.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(
        cls, crop: str | None = None, align: str | None = None, mask_marks: str | None = None
    ) -> bool | str:
        # ComfyUI 0.3.75 checks no V3 combo against its options (0.33 does, unless named here): this node
        # does, on both. None: the value comes through a link, known only when the node runs.
        return (choice_error("crop", crop, CROPS) or choice_error("align", align, ALIGNS)
                or choice_error("mask_marks", mask_marks, MASK_MARKS) or True)

    @classmethod
    @names_the_node("Encode Subject Image(s)")
    def execute(
        cls,
        encoder: EncoderHandle,
        image: torch.Tensor,
        crop: str = "center",
        mask: torch.Tensor | None = None,
        align: str = "auto",
        face_index: int = 0,
        mask_marks: str = "auto",
    ) -> io.NodeOutput:
        images = subject_images(encoder, image, mask, align=align, face_index=face_index, mask_marks=mask_marks)
        return io.NodeOutput(encode_subject(encoder, images, None, crop=crop != "none"), images)


# ------------------------------------------------------------------------------------------------
# Saving and loading


def save_subject(path: str, subject: Subject) -> None:
    config = subject.encoder.config
    metadata = {
        "format": SUBJECT_FORMAT,
        "format_version": str(SUBJECT_FORMAT_VERSION),
        "encoder": subject.encoder.name,
        "encoder_fingerprint": subject.encoder.fingerprint,
        "domain": config.domain,
        "token": config.token,
        "name": subject.name,
        "images": str(subject.images),
    }
    write_safetensors(path, {"tokens": subject.tokens.detach().to("cpu", torch.float32).contiguous()}, metadata)


def older_subject_fingerprint(encoder: NestedEncoder) -> str:
    """The encoder fingerprint in subject files saved before the pack's fingerprints became one (16 hex digits:
    the config and three of the weights; now `nested_attention.weights.weights_fingerprint`). Read only, so those
    files keep loading with their encoder."""
    digest = hashlib.sha256(encoder.config.to_json().encode())
    for tensor in (encoder.qformer.latents, encoder.qformer.proj_out.weight, encoder.projections[-1].to_v.weight[:8]):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_subject(path: str, handle: EncoderHandle) -> Subject:
    name = os.path.basename(path)
    problem = file_problem(path)
    if problem:
        raise SubjectError(f"{name} {problem}. Expected a subject saved by Save Nested Subject.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != SUBJECT_FORMAT:
                raise SubjectError(
                    f"{name} is not a saved nested attention subject (format {metadata.get('format')!r}, "
                    f"expected {SUBJECT_FORMAT!r}); save subjects with Save Nested Subject."
                )
            if metadata.get("format_version") != str(SUBJECT_FORMAT_VERSION):
                raise SubjectError(
                    f"{name} has subject format version {metadata.get('format_version')!r}; this pack reads "
                    f"version {SUBJECT_FORMAT_VERSION}. Encode the photos again."
                )
            if set(f.keys()) != {"tokens"}:
                raise SubjectError(
                    f"{name} holds the tensors {sorted(f.keys())[:6]}; a saved subject holds one, 'tokens'. The "
                    "file is damaged or was edited: save the subject again."
                )
            dtype = f.get_slice("tokens").get_dtype()
            if dtype not in FLOAT_DTYPES:
                raise SubjectError(
                    f"{name}: its 'tokens' are {dtype}, expected float32 (as Save Nested Subject writes them); the "
                    "file is damaged: save the subject again."
                )
            tokens = f.get_tensor("tokens")
    except (SafetensorError, OSError) as e:
        raise SubjectError(
            f"{name} is not a readable .safetensors file ({e}); save the subject again."
        ) from e
    stored = metadata.get("encoder_fingerprint")
    if stored != (older_subject_fingerprint(handle.encoder) if len(str(stored)) == 16 else handle.fingerprint):
        raise SubjectError(
            f"{name} was encoded with encoder {metadata.get('encoder')!r}, not with the connected "
            f"{handle.name}: subject tokens only mean something to the encoder that made them. Connect that "
            "encoder, or encode the photos again with this one."
        )
    width = handle.config.qformer.output_dim
    if (
        tokens.dim() != 3
        or tokens.shape[0] != 1
        or tokens.shape[2] != width
        or tokens.shape[1] % handle.config.num_tokens
        or tokens.shape[1] == 0
    ):
        raise SubjectError(
            f"{name}: tokens of shape {tuple(tokens.shape)}, expected (1, n*{handle.config.num_tokens}, "
            f"{width}); the file is damaged, save the subject again."
        )
    bad = count_non_finite(tokens)
    if bad:  # NaN tokens would give NaN subject values: black images
        raise SubjectError(
            f"{name}: its 'tokens' hold {bad} NaN or infinite value(s); they would give black images. The file is "
            "damaged: encode the photos again and save the subject."
        )
    images = tokens.shape[1] // handle.config.num_tokens  # what the file's "images" says, counted from the tokens
    return Subject(tokens=tokens.float(), encoder=handle, name=metadata.get("name", "subject"), images=images)


def subject_files() -> list[str]:
    """Saved subjects in input/nested_attention_subjects and (annotated) output/nested_attention_subjects."""
    files = []
    for kind, base in (
        ("", folder_paths.get_input_directory()),
        (" [output]", folder_paths.get_output_directory()),
    ):
        folder = os.path.join(base, SUBJECT_DIR)
        if os.path.isdir(folder):
            files += [
                f"{SUBJECT_DIR}/{f}{kind}" for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            ]
    return files


class NestedAttentionSaveSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionSaveSubject",
            display_name="Save Nested Subject",
            category=CATEGORY,
            description="Saves an encoded subject (.safetensors in output/nested_attention_subjects), to "
            "reuse it without the photos.",
            inputs=[
                NestedSubjectType.Input("subject", tooltip="From Encode Subject Image(s)."),
                io.String.Input(
                    "filename_prefix",
                    default=f"{SUBJECT_DIR}/subject",
                    tooltip="File name prefix, relative to ComfyUI's output folder.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    @names_the_node("Save Nested Subject")
    def execute(cls, subject: Subject, filename_prefix: str = f"{SUBJECT_DIR}/subject") -> io.NodeOutput:
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory()
        )
        file = f"{filename}_{counter:05}_.safetensors"
        save_subject(os.path.join(folder, file), subject)
        log.info("%s saved %s to %s", LOG_PREFIX, subject.describe(), os.path.join(folder, file))
        # web/save_subject.js shows these names on the node.
        return io.NodeOutput(ui={"subjects": [{"filename": file, "subfolder": subfolder, "type": "output"}]})


class NestedAttentionLoadSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionLoadSubject",
            display_name="Load Nested Subject",
            category=CATEGORY,
            description="Loads a subject saved by Save Nested Subject; it must come from the connected "
            "encoder.",
            inputs=[
                NestedEncoderType.Input("encoder", tooltip="The encoder the subject was encoded with."),
                io.Combo.Input(
                    "subject_file",
                    options=subject_files(),
                    tooltip="A saved subject from input/nested_attention_subjects, or from output/ (marked "
                    "[output]).",
                ),
            ],
            outputs=[NestedSubjectType.Output("subject", display_name="subject")],
        )

    @classmethod
    def validate_inputs(cls, subject_file: str | None = None) -> bool | str:
        # ComfyUI 0.3.75 checks no V3 combo against its options (0.33 does, unless named here): this node
        # does, on both, and says where it looked.
        listed = subject_files()
        if subject_file is None or subject_file in listed:
            return True
        return (
            f"saved subject {subject_file!r} is not in input/{SUBJECT_DIR} or output/{SUBJECT_DIR} (found: "
            f"{', '.join(listed) or 'no saved subject'}). Save it with Save Nested Subject, or copy the file "
            f"into ComfyUI's input/{SUBJECT_DIR}; then press R in the graph to refresh the lists and pick it."
        )

    @classmethod
    def fingerprint_inputs(cls, encoder: EncoderHandle | None = None, subject_file: str = "") -> str:
        # Run again when the file changed (saved over with the same name), not only when the name did.
        path = folder_paths.get_annotated_filepath(subject_file)
        return f"{os.path.getmtime(path)}:{os.path.getsize(path)}" if os.path.isfile(path) else subject_file

    @classmethod
    @names_the_node("Load Nested Subject")
    def execute(cls, encoder: EncoderHandle, subject_file: str) -> io.NodeOutput:
        path = folder_paths.get_annotated_filepath(subject_file)
        if not os.path.isfile(path):
            raise SubjectError(
                f"saved subject {subject_file!r} not found at {path}; save it again or pick another file."
            )
        return io.NodeOutput(load_subject(path, encoder))
