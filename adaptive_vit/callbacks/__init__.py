"""Callbacks around every method: threshold calibration, FLOPs-budget tracking, robustness, model EMA.

Imported by the CLI, so configs name them by short name (``class_path: ThresholdCalibration``).
"""

from adaptive_vit.callbacks.calibration import ThresholdCalibration
from adaptive_vit.callbacks.ema import ModelEMA
from adaptive_vit.callbacks.flops_budget import FlopsBudgetTracker
from adaptive_vit.callbacks.predictions import PredictionWriter
from adaptive_vit.callbacks.robustness import RobustnessEvaluation
from adaptive_vit.callbacks.visualize import VisualizeDecisions

__all__ = ["FlopsBudgetTracker", "ModelEMA", "PredictionWriter", "RobustnessEvaluation", "ThresholdCalibration", "VisualizeDecisions"]
