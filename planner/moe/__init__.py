"""Mixture-of-experts models: expert discovery and units (`experts`), expert levels built from the
tokens each expert is routed (`levels`), expert statistics on calibration data (`stats`), the
inputs of the `moe-lp` allocation (`allocate`), a real-weight MoE made from a dense model
(`moefy`) and the per-expert bit heatmap (`heatmap`).

Nothing is imported here: `heatmap` is read by the report (which never imports torch), the rest
by the pipeline.
"""
