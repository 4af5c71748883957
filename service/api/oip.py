"""The Open Inference Protocol (KServe V2) routes. (Being written.)"""
from fastapi import APIRouter

router = APIRouter(tags=["oip"])
