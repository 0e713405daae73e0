"""WanDistiller: distil the Wan 2.2 text-to-video model into Wan-Lite, a small 2D text-to-image transformer."""

from .data import read_prompts
from .teacher import Teacher, TeacherNotAvailableError, load_teacher
from .toy import make_tiny_wan, tiny_wan_path

__all__ = ["Teacher", "TeacherNotAvailableError", "load_teacher", "make_tiny_wan", "read_prompts", "tiny_wan_path"]
__version__ = "0.1.0"
