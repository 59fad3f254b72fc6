# The embcomp gRPC compression service. No build tools needed: the generated gRPC code
# is committed, so this is the README's install step plus `embcomp serve`.
#   docker build -t embcomp .
#   docker run -p 50051:50051 -v embcomp-store:/data embcomp
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the package with the service extra and the compiled kernels (numba), and
# compile them now into numba's cache so the first requests do not wait for it.
COPY . /src
RUN pip install "/src[service,fast]" && rm -rf /src \
    && python -c "import embcomp._jit as jit; jit.warm_up()"

# A non-root user owning the codec store, which lives on a volume.
RUN useradd --create-home --uid 10001 embcomp && mkdir /data && chown embcomp:embcomp /data
VOLUME /data
USER embcomp
WORKDIR /home/embcomp

# Settings come from EMBCOMP_* variables (see `embcomp serve --help`); add e.g.
# EMBCOMP_AUTH_TOKEN, EMBCOMP_TLS_CERT/EMBCOMP_TLS_KEY, EMBCOMP_METRICS_PORT at run time.
ENV EMBCOMP_HOST=0.0.0.0 \
    EMBCOMP_PORT=50051 \
    EMBCOMP_STORE=/data \
    EMBCOMP_GRACE_SECONDS=8
EXPOSE 50051

# The standard gRPC health service (exempt from auth), asked by `embcomp health`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["embcomp", "health", "--timeout", "4"]

# `docker stop` sends SIGTERM: in-flight calls get EMBCOMP_GRACE_SECONDS to finish, set
# below Docker's 10 s kill timeout (raise both together with `docker run --stop-timeout`).
CMD ["embcomp", "serve"]
