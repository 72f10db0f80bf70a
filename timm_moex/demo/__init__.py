"""``moex-demo``: what MoEx does to two images, in pixel space and at a model's stem (an application beside
``timm_moex.train``; the library never imports it)."""
