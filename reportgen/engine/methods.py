"""Names and display labels of the attribution methods, shared by the engines that compute them and the
sections that offer them (`gradcam`, `saliency`, `sanity`). No TensorFlow here, so the spec's schema can
use the names without starting it."""

from __future__ import annotations

# Class activation maps (`reportgen.engine.gradients.GradientEngine.cams`), in their canonical order.
CAM_METHODS = ("gradcam", "gradcam++", "layercam", "scorecam", "faster-scorecam")
GRADIENT_CAMS = CAM_METHODS[:3]  # computed together from one forward + backward pass
# Input-space methods (`reportgen.engine.attribution`).
ATTRIBUTION_METHODS = (
    "vanilla",
    "smoothgrad",
    "integrated_gradients",
    "vargrad",
    "gradient_x_input",
    "guided_backprop",
    "deconvnet",
)
NOISY = ("smoothgrad", "vargrad")  # the methods that share one set of noisy copies of each image
LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "layercam": "LayerCAM",
    "scorecam": "Score-CAM",
    "faster-scorecam": "Faster-ScoreCAM",
    "vanilla": "vanilla gradient",
    "smoothgrad": "SmoothGrad",
    "integrated_gradients": "integrated gradients",
    "vargrad": "VarGrad",
    "gradient_x_input": "gradient × input",
    "guided_backprop": "guided backprop",
    "deconvnet": "deconvnet",
}
