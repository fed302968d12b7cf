"""OncoFM: explainable multimodal 5-year cancer survival prediction.

Gene expression (+ CNV, mutations) and H&E whole-slide images in; a 5-year prediction out, explained
in natural language and as an attention heatmap on the slide. Every pipeline stage is a library
function taking typed settings (``oncofm.config``) and writing its artifacts under one run directory
(``oncofm.paths.RunLayout``). The CLI (``oncofm.cli``) and web app (``oncofm.web``) are thin layers.
"""

__version__ = "0.1.0"
