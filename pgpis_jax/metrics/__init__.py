"""Image-quality metrics (FID, LPIPS, SSIM, PSNR): the networks they use, their statistics, paper protocols."""
