"""The FastAPI app: public pages (public.py) and the admin JSON API (api.py)."""
