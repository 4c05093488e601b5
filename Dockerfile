# A CPU image of `smolvlm serve` with the C++ kernels prebuilt (no CUDA packages: torch from its CPU index).
# docker build -t smolvlm . && docker run -p 8000:8000 -e SMOLVLM_MODEL=HuggingFaceTB/SmolVLM2-256M-Video-Instruct smolvlm
FROM python:3.11-slim-bookworm

# g++ builds the kernels (here, once); it stays for torch's extension loader, which checks the compiler at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY smolvlm ./smolvlm
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -c constraints.txt .

# Kernels are built into the cache folder now, not at the first request (they need AVX512-BF16 on the build host).
ENV XDG_CACHE_HOME=/app/.cache \
    SMOLVLM_HOST=0.0.0.0 \
    SMOLVLM_PORT=8000
RUN python -c "from smolvlm.model import kernels; kernels.build()"

RUN useradd --uid 1000 --create-home smolvlm && chown -R 1000 /app
USER 1000
EXPOSE 8000
HEALTHCHECK CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
ENTRYPOINT ["smolvlm", "serve"]
