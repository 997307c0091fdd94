"""The tiny test bed (`--domain tiny`): SDXL-shaped models small enough for a CPU, built in code.

    models  tiny UNet / VAE / text encoders / CLIP vision with ComfyUI's classes, tiny encoders, tiny data
"""
