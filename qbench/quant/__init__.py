"""Shared quantization building blocks: integer grids, bit packing, quantized linear modules."""
