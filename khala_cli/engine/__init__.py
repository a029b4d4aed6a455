"""The Khala model over tensors and ids: transformer, decode, super-res, codec, pipeline.

Knows nothing of manifests, files of outputs or processes. Imports torch.
"""
