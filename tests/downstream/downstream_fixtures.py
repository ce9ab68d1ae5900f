"""Constants shared by the downstream tests (imported by module name: conftest names collide)."""

TINY_VIT = dict(backbone="vit", img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
# Phantom labels kept for fine-tuning: liver, right lung, left lung (raymim.data.synth.LABELS).
FT = {"classes": [2, 5, 6], "class_names": ["liver", "lung_right", "lung_left"], "batch_size": 1,
      "feature_size": 8, "norm_name": "batch", "overlays": 1, "quick_steps": 2}
