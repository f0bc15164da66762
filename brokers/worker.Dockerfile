# The meshjobs worker image: meshjobs in a virtual environment on BASE, from
# wheels built on the host (`meshjobs mesh images` puts them in wheels/ next to
# this file), installed with --no-index: the build needs no network. BASE is
# python:3.11-slim where a registry is reachable; scripts/build-python-base
# makes an equivalent offline (`meshjobs mesh images --base IMAGE`).
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PATH=/opt/meshjobs/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MESHJOBS_HOME=/run/meshjobs HOME=/tmp
WORKDIR /opt/meshjobs
ENTRYPOINT ["meshjobs"]
CMD ["--help"]
# The dependencies first: their layers stay cached while only meshjobs changes.
COPY wheels/deps/ /tmp/wheels/
RUN python3 -m venv /opt/meshjobs \
 && pip install --no-cache-dir --no-index --find-links /tmp/wheels /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY wheels/meshjobs/ /tmp/wheels/
RUN pip install --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels \
 && pip check && meshjobs --version
USER 10001:10001
