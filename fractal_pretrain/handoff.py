"""The backbone hand-off from pre-training to ``ad_eval``: one definition of the file format.

A backbone is two files in one folder: ``backbone.pt``, a torchvision ResNet state dict without
``fc.*``, and ``backbone.json``, ``{"format": FORMAT, "arch", "mean", "std", "image_size" (the side the network
was trained at: the augmentation's output, a fixed set's [H, W], else the rendered size), "objective", "recipe",
"recipe_config", "seed", "epoch", "steps", "source", "images"}``. ``fractal_pretrain.train.backbone`` writes
them, ``ad_eval.backbones`` reads them; both take the names below from here.
"""

FORMAT = "fractal-pretrain-backbone/1"  # the "format" value of backbone.json
WEIGHTS_NAME = "backbone.pt"
META_NAME = "backbone.json"
# backbone.json fields an evaluation record repeats as backbone_<field>: which pre-training it scores
PROVENANCE_FIELDS = ("recipe", "seed", "steps")
