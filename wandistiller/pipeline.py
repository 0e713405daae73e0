"""WanLitePipeline: text -> image with the 2D student, using the teacher's text encoder, VAE and scheduler.

The pipeline is WanPipeline's sampling loop without a temporal axis: the same prompt encoding (borrowed from
WanPipeline, not re-written), the same noise for the same generator (a single-frame Wan latent has exactly the
elements of a 2D one), the same scheduler steps and classifier-free guidance, and the same VAE decoding. A
student projected at the teacher's full size therefore samples the teacher's image.

A CFG-distilled student needs one forward per step: its pipeline skips the unconditional pass unless a call
asks for `guidance_scale > 1`; a student trained on unguided targets samples with its teacher's guidance.

`export_pipeline` writes the self-contained folder a distillation run ends with (`output_dir/pipeline`):
student, tokenizer, text encoder, the exact 2D form of the teacher's VAE (`WanVAE2D`) and scheduler, so that
`WanLitePipeline.from_pretrained(folder)` samples offline with no 3D op and no teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, WanPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

# Imported here so that `WanLitePipeline.from_pretrained` finds the student's and the 2D VAE's classes: diffusers
# resolves the custom components "wandistiller.model" and "wandistiller.vae2d" in model_index.json from the
# already-imported modules.
from .flow import MAX_SEQUENCE_LENGTH, NUM_TRAIN_TIMESTEPS, few_step_sigmas, guided_velocity, per_token_timesteps
from .model import WanLiteTransformer2DModel
from .teacher import read_json
from .vae2d import WanVAE2D, vae_to_2d

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_IMAGE_SIZE = 64
PIPELINE_DIR = "pipeline"  # the folder under a distillation run's output_dir that `distill` exports


def decode_wan_latents(vae, latents: torch.Tensor, image_processor: VaeImageProcessor, output_type: str = "pil"):
    """Images from normalised (B, C, h, w) latents, de-normalised exactly as WanPipeline does, so the pixels match
    bit for bit; a 3D Wan VAE decodes them as one-frame videos, its 2D form (`WanVAE2D`) as images."""
    is_3d = isinstance(vae, AutoencoderKLWan)
    latents = (latents.unsqueeze(2) if is_3d else latents).to(get_module_execution_device(vae), dtype=vae.dtype)
    shape = (1, vae.config.z_dim) + (1,) * (latents.ndim - 2)
    latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    latents = latents / latents_std + latents_mean  # WanPipeline's arithmetic
    images = vae.decode(latents, return_dict=False)[0]
    return image_processor.postprocess(images[:, :, 0] if is_3d else images, output_type=output_type)


class WanLitePipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with a Wan-Lite student.

    Parameters:
        transformer ([`WanLiteTransformer2DModel`]):
            The 2D student that predicts the flow-matching velocity `noise - x0`.
        vae ([`WanVAE2D`] or [`AutoencoderKLWan`]):
            The teacher's Wan VAE: its exact 2D form (`vae_to_2d`, what `export_pipeline` stores) decodes images;
            the 3D one decodes them as single-frame videos, with the same pixels.
        scheduler ([`SchedulerMixin`]):
            A flow-matching scheduler (the teacher's `UniPCMultistepScheduler`, or `FlowMatchEulerDiscreteScheduler`).
        tokenizer ([`T5Tokenizer`], *optional*):
            The teacher's tokenizer; not needed when every call passes `prompt_embeds`.
        text_encoder ([`UMT5EncoderModel`], *optional*):
            The teacher's text encoder; not needed when every call passes `prompt_embeds`.
        expand_timesteps (`bool`, defaults to `False`):
            Give the transformer one timestep per latent patch, as WanPipeline does for Wan 2.2 TI2V-5B.
        cfg_distilled (`bool`, defaults to `True`):
            The student learned the teacher's guided velocity, so sampling skips guidance by default.
        teacher_guidance_scale (`float`, *optional*):
            The default guidance of a student that is not CFG-distilled (its teacher's scale); None: 1.0.
        few_step (`bool`, defaults to `False`):
            The student was reflowed (straight paths): n sampling steps go through the evenly spaced noise levels
            1, 1 - 1/n, ..., 1/n, then 0, with a flow-matching Euler scheduler (`few_step_scheduler()`).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder"]

    # WanPipeline's T5 encoding (prompt cleaning, truncation, cut to the true length, zero-padding to
    # max_sequence_length): the student must see exactly the embeddings the teacher was given.
    _get_t5_prompt_embeds = WanPipeline._get_t5_prompt_embeds

    def __init__(self, transformer: WanLiteTransformer2DModel, vae, scheduler, tokenizer=None, text_encoder=None,
                 expand_timesteps: bool = False, cfg_distilled: bool = True,
                 teacher_guidance_scale: float | None = None, few_step: bool = False):
        super().__init__()
        if transformer.config.in_channels != vae.config.z_dim:
            raise ValueError(f"the student takes {transformer.config.in_channels} latent channels but the VAE makes "
                             f"{vae.config.z_dim}: use the VAE of the teacher the student was built from")
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, tokenizer=tokenizer,
                              text_encoder=text_encoder)
        self.register_to_config(expand_timesteps=expand_timesteps, cfg_distilled=cfg_distilled,
                                teacher_guidance_scale=teacher_guidance_scale, few_step=few_step)
        self.vae_scale_factor = vae.config.scale_factor_spatial
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_teacher(cls, teacher, student: WanLiteTransformer2DModel, scheduler=None, *, vae_2d: bool = False,
                     cfg_distilled: bool = True, teacher_guidance_scale: float | None = None,
                     few_step: bool = False) -> "WanLitePipeline":
        """A pipeline for `student` sharing the teacher's VAE, tokenizer and text encoder.

        `teacher` is a `Teacher` (see `load_teacher`) or a WanPipeline. `scheduler` defaults to a fresh copy of
        the teacher's scheduler (same class and config), or with `few_step` to `few_step_scheduler()`. `vae_2d` swaps the VAE for its exact 2D form.
        `teacher_guidance_scale` defaults to a `Teacher`'s own scale. A released text encoder stays None: the
        pipeline then needs `prompt_embeds` (e.g. from `Teacher.encode_prompts`).
        """
        wan = getattr(teacher, "pipe", teacher)
        if scheduler is None:
            scheduler = few_step_scheduler() if few_step else type(wan.scheduler).from_config(wan.scheduler.config)
        if teacher_guidance_scale is None and wan is not teacher:
            teacher_guidance_scale = teacher.guidance_scale
        return cls(transformer=student, vae=vae_to_2d(wan.vae) if vae_2d else wan.vae, scheduler=scheduler,
                   tokenizer=wan.tokenizer, text_encoder=wan.text_encoder,
                   expand_timesteps=bool(wan.config.get("expand_timesteps", False)), cfg_distilled=cfg_distilled,
                   teacher_guidance_scale=teacher_guidance_scale, few_step=few_step)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "WanLitePipeline":
        """`DiffusionPipeline.from_pretrained`; a local path is checked first (`check_pipeline_folder`), so a
        folder that is not a Wan-Lite pipeline is a one-line error instead of a failure deep in diffusers."""
        name = str(pretrained_model_name_or_path)
        if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:  # local
            name = str(check_pipeline_folder(Path(name).expanduser()))
        return super().from_pretrained(name, **kwargs)

    # --- inputs ----------------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> tuple[int, int]:
        """Height and width (pixels) must be multiples of these: VAE downsampling times the patch size."""
        p_h, p_w = self.transformer.config.patch_size
        return self.vae_scale_factor * p_h, self.vae_scale_factor * p_w

    def default_image_size(self) -> tuple[int, int]:
        """The transformer's `sample_size` (latent pixels, the diffusers convention) in pixels, else 64x64."""
        sample_size = getattr(self.transformer.config, "sample_size", None)
        if sample_size is None:
            return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def default_guidance_scale(self) -> float:
        """1.0 (one forward per step) for a CFG-distilled student, else its teacher's guidance scale."""
        if self.config.cfg_distilled or self.config.teacher_guidance_scale is None:
            return 1.0
        return float(self.config.teacher_guidance_scale)

    def check_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                     output_type):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise TypeError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}")
        m_h, m_w = self.size_multiple
        if height % m_h or width % m_w:
            raise ValueError(f"height and width must be multiples of {m_h}x{m_w} (VAE factor {self.vae_scale_factor} "
                             f"x patch {tuple(self.transformer.config.patch_size)}), got {height}x{width}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")

    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance: bool = True,
                      prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                      device=None, dtype=None):
        """(prompt_embeds, negative_prompt_embeds) exactly as WanPipeline.encode_prompt makes them.

        Without guidance the negative embeddings are None. The text encoder is needed only for what is not
        passed in; when it is missing (released to save memory) this says so instead of failing inside T5.
        """
        missing = prompt_embeds is None or (do_classifier_free_guidance and negative_prompt_embeds is None)
        if missing and (self.text_encoder is None or self.tokenizer is None):
            what = "prompt" if prompt_embeds is None else "negative prompt (guidance_scale > 1)"
            raise ValueError(f"this pipeline has no text encoder, so it cannot encode the {what}: pass "
                             "`prompt_embeds` (and `negative_prompt_embeds` when guidance_scale > 1), e.g. from "
                             "Teacher.encode_prompts, or build the pipeline before releasing the text encoder")
        prompt_embeds, negative_prompt_embeds = WanPipeline.encode_prompt(
            self, prompt, negative_prompt, do_classifier_free_guidance, 1, prompt_embeds, negative_prompt_embeds,
            max_sequence_length, device, dtype,
        )
        if not do_classifier_free_guidance:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    def prepare_latents(self, batch_size: int, height: int, width: int, device, generator=None, latents=None):
        """Float32 noise (B, C, H/s, W/s); given `latents` (also Wan's single-frame (B, C, 1, h, w)) are checked."""
        shape = (batch_size, self.transformer.config.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            if isinstance(generator, list) and len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)} but this call needs {shape} "
                             f"(batch, channels, height/{self.vae_scale_factor}, width/{self.vae_scale_factor})")
        return latents.to(device=device, dtype=torch.float32)

    def _timestep_input(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps, or (B, num_patches) for per-token (TI2V-style) conditioning."""
        timesteps = t.expand(latents.shape[0])
        if not self.config.expand_timesteps:
            return timesteps
        return per_token_timesteps(timesteps, latents.shape[-2:], self.transformer.config.patch_size)

    # --- outputs ---------------------------------------------------------------------------------------------
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """Decode (B, C, h, w) latents, de-normalised exactly as WanPipeline does; a 3D VAE gets one frame."""
        return decode_wan_latents(self.vae, latents, self.image_processor, output_type)

    # --- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, *,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None, width: int | None = None, num_inference_steps: int = 8,
        guidance_scale: float | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images from text.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s); pass `prompt_embeds` instead when the pipeline has no text encoder.
            negative_prompt (`str` or `list[str]`, *optional*):
                Used only with `guidance_scale > 1`; defaults to "" as in WanPipeline.
            prompt_embeds (`torch.Tensor` of shape `(batch_size, max_sequence_length, text_dim)`, *optional*):
                Pre-computed text embeddings (e.g. `Teacher.encode_prompts`).
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-computed negative embeddings, for `guidance_scale > 1`.
            height (`int`, *optional*), width (`int`, *optional*):
                Image size in pixels, multiples of `size_multiple`. Default: taken from `latents` when given,
                else `default_image_size()`.
            num_inference_steps (`int`, defaults to 8):
                Scheduler steps.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance; 1.0 means one (conditional) forward per step. Default:
                `default_guidance_scale()` (1.0 for a CFG-distilled student, else its teacher's scale).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes the noise deterministic; the same generator gives the same noise as WanPipeline with
                `num_frames=1`.
            latents (`torch.Tensor`, *optional*):
                Initial noise (B, C, H/s, W/s); the teacher's single-frame noise (B, C, 1, H/s, W/s) is accepted.
            output_type (`str`, defaults to `"pil"`):
                "pil" (list of PIL images), "np" (B, H, W, 3), "pt" (B, 3, H, W) in [0, 1], or "latent"
                (the final latents (B, C, H/s, W/s), not decoded).
            return_dict (`bool`, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of the tuple `(images,)`.
            max_sequence_length (`int`, defaults to `flow.MAX_SEQUENCE_LENGTH`):
                Text length the embeddings are padded to (WanPipeline's).
        """
        latents, height, width = self._image_size(latents, height, width)
        self.check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, output_type)
        device = self._execution_device
        batch_size = prompt_embeds.shape[0] if prompt is None else 1 if isinstance(prompt, str) else len(prompt)
        guidance_scale = self.default_guidance_scale() if guidance_scale is None else guidance_scale
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, guidance_scale > 1.0, prompt_embeds, negative_prompt_embeds, max_sequence_length,
            device,
        )
        self._set_timesteps(num_inference_steps, device)
        latents = self.prepare_latents(batch_size, height, width, device, generator, latents)
        latents = self._denoise(latents, prompt_embeds, negative_prompt_embeds, guidance_scale, device)
        images = latents if output_type == "latent" else self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _set_timesteps(self, num_inference_steps: int, device) -> None:
        """The scheduler's own steps, or for a few-step student the evenly spaced noise levels 1, ..., 1/n."""
        if not self.config.get("few_step", False):
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            return
        self.scheduler.set_timesteps(sigmas=few_step_sigmas(num_inference_steps).tolist(), device=device)

    def _image_size(self, latents, height, width) -> tuple:
        """(latents without a frame axis, height, width): the size from the arguments, the latents or the default."""
        if latents is not None and latents.ndim == 5:
            if latents.shape[2] != 1:
                raise ValueError(f"latents with a frame axis must have one frame, got shape {tuple(latents.shape)}")
            latents = latents.squeeze(2)
        if latents is not None and (height is None or width is None):
            height = height or latents.shape[-2] * self.vae_scale_factor
            width = width or latents.shape[-1] * self.vae_scale_factor
        default_h, default_w = self.default_image_size()
        return latents, height or default_h, width or default_w

    def _denoise(self, latents, prompt_embeds, negative_prompt_embeds, guidance_scale: float, device) -> torch.Tensor:
        """WanPipeline's sampling loop on 2D latents: the scheduler's steps (set before), guided when g > 1."""
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(device, dtype)
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
        timesteps = self.scheduler.timesteps
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for t in timesteps:
                model_input = latents.to(dtype)
                timestep = self._timestep_input(t, latents)
                velocity = self.transformer(model_input, timestep, prompt_embeds, return_dict=False)[0]
                if do_cfg:
                    uncond = self.transformer(model_input, timestep, negative_prompt_embeds, return_dict=False)[0]
                    velocity = guided_velocity(velocity, uncond, guidance_scale)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                progress_bar.update()
        return latents


def few_step_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The sampler of a reflowed (few-step) student: flow-matching Euler with straight noise levels (shift 1), n
    steps from sigma 1 evenly down to 0. Reflow straightens the student's paths from noise to image, so a few
    Euler steps follow them; Wan's shift would crowd those steps at high noise. (`WanLitePipeline` with
    `few_step=True` gives it the noise levels 1, 1 - 1/n, ..., 1/n: the scheduler's own spacing ends at 1/1000,
    which would waste one of a few steps.)"""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)


def check_pipeline_folder(folder: str | Path) -> Path:
    """`folder` if it holds a saved Wan-Lite pipeline with every component's subfolder; else a one-line error."""
    folder = Path(folder)
    fix = "pass the pipeline folder a distillation run writes (output_dir/pipeline), or export one with export_pipeline"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: {fix}")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a Wan-Lite pipeline (no model_index.json): {fix}")
    index = read_json(folder / "model_index.json")
    found = index.get("_class_name") if isinstance(index, dict) else type(index).__name__
    if found != WanLitePipeline.__name__:
        raise ValueError(f"{folder} holds a {found}, not a Wan-Lite pipeline: {fix}")
    missing = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
               and value[0] is not None and not (folder / name).is_dir()]
    if missing:
        raise ValueError(f"{folder} is an incomplete Wan-Lite pipeline (no {', '.join(missing)} folder): "
                         "export it again")
    return folder


def export_pipeline(folder: str | Path, student: WanLiteTransformer2DModel | str | Path, teacher_source: str | Path,
                    *, cfg_distilled: bool, teacher_guidance_scale: float | None = None, vae_2d: bool = True,
                    overwrite: bool = False, few_step: bool = False) -> Path:
    """Write a self-contained WanLitePipeline to `folder`: `student` (a model or its saved folder) with the
    tokenizer, text encoder, VAE (its exact 2D form unless `vae_2d=False`) and scheduler of the Wan pipeline in
    `teacher_source` (a local folder; the teacher's transformers are not loaded). A reflowed student
    (`few_step=True`) gets `few_step_scheduler()` instead of the teacher's scheduler, and the folder records it,
    so that loading it samples in few Euler steps by default.

    The folder appears atomically (written under a temporary name, then renamed), so it is either complete or
    absent; an existing one is replaced only with `overwrite=True`. Returns `folder`.
    """
    from .toy import write_pipeline

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists: pass overwrite=True to replace it, or choose another folder")
    if not isinstance(student, WanLiteTransformer2DModel):
        student = WanLiteTransformer2DModel.from_pretrained(student)
    wan = WanPipeline.from_pretrained(teacher_source, transformer=None, transformer_2=None)
    pipe = WanLitePipeline.from_teacher(wan, student, vae_2d=vae_2d, cfg_distilled=cfg_distilled,
                                        teacher_guidance_scale=teacher_guidance_scale, few_step=few_step)
    return write_pipeline(pipe, folder, overwrite=overwrite)
