"""One edit, picture in → picture out: settings, conditioning, the denoiser, the sampling loop, regions and masks."""
