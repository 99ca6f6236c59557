"""The models' names, kept apart from the code that loads them: the command line shows them in its help
without importing torch."""

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
AUFFUSION_ID = "auffusion/auffusion-full-no-adapter"
TINY_MODELS = "tiny"  # small random models built offline (tests, demos)
