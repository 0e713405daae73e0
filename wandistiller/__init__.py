"""WanDistiller: distil the Wan 2.2 text-to-video model into Wan-Lite, a small 2D text-to-image transformer."""

from .cache import build_target_cache, load_target_cache, stream_target_cache
from .data import TargetSpec, read_prompts
from .loops import Callback, DistillConfig, DistillResult, distill, record_targets
from .model import WanLiteTransformer2DModel, load_student_config
from .pipeline import WanLitePipeline, export_pipeline
from .projection import ProjectionReport, make_calibration, measure_importance, project
from .teacher import Teacher, TeacherNotAvailableError, load_teacher
from .toy import make_tiny_wan, tiny_wan_path
from .vae2d import WanVAE2D, vae_to_2d

__all__ = [
    "Callback", "DistillConfig", "DistillResult", "TargetSpec", "Teacher", "TeacherNotAvailableError", "WanLitePipeline",
    "ProjectionReport", "WanLiteTransformer2DModel", "WanVAE2D", "build_target_cache", "export_pipeline",
    "make_calibration", "measure_importance", "project", "distill", "load_student_config", "load_target_cache",
    "load_teacher", "make_tiny_wan", "read_prompts", "record_targets", "stream_target_cache", "tiny_wan_path",
    "vae_to_2d",
]
__version__ = "0.1.0"
