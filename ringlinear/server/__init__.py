"""OpenAI-compatible HTTP server over the ringlinear engine (`ringlinear serve`). Needs fastapi + uvicorn
(`pip install 'ringlinear[serve]'`); they are imported only when serving."""
