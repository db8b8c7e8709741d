"""Tests of pacs.verify: categories (true and false pairs), extraction, limits, threads, fuzzing, CLI, agreement."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacs.verify import math_reward, verify, verify_batch
from pacs.verify.extract import extract_answer, extract_gold
from pacs.verify.normalize import parse_answer, quick_equal

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "tests" / "data" / "verify_pairs.jsonl"
LIMIT = 2.0
SLACK = 1.5  # process round trip and worker replacement on a loaded 2-core machine

# (category, gold, response, expected)
CATEGORY_PAIRS = [
    ("thousands", "7425000", "\\boxed{7,425,000}", True),
    ("thousands", "7425000", "\\boxed{7,425,001}", False),
    ("thousands", "1000", "The total is 1\\,000 dollars, so \\boxed{1{,}000}", True),
    ("decimal-fraction", "1/2", "\\boxed{0.5}", True),
    ("decimal-fraction", "\\frac{1}{2}", "\\boxed{0.6}", False),
    ("decimal-fraction", "0.125", "\\boxed{\\frac{1}{8}}", True),
    ("radical", "2\\sqrt{2}", "\\boxed{\\sqrt{8}}", True),
    ("radical", "\\sqrt{3}", "\\boxed{\\sqrt{2}}", False),
    ("pi", "2\\pi", "\\boxed{6.2832}", True),
    ("pi", "2\\pi", "\\boxed{\\pi}", False),
    ("e", "e^{2}", "\\boxed{e^2}", True),
    ("e", "e", "\\boxed{2.7}", False),
    ("scientific", "1.5\\times10^{3}", "\\boxed{1500}", True),
    ("scientific", "3\\times10^{8}", "\\boxed{3e8}", True),
    ("scientific", "3\\times10^{8}", "\\boxed{3\\times 10^{9}}", False),
    ("percent", "28\\%", "\\boxed{28}", True),
    ("percent", "28\\%", "\\boxed{0.28}", True),
    ("percent", "28\\%", "\\boxed{27\\%}", False),
    ("degrees", "90^\\circ", "\\boxed{90}", True),
    ("degrees", "90^\\circ", "\\boxed{\\frac{\\pi}{2}}", True),
    ("degrees", "90^\\circ", "\\boxed{45^\\circ}", False),
    ("degrees-trig", "\\frac{1}{2}", "\\boxed{\\sin 30^\\circ}", True),
    ("degrees-trig", "\\frac{1}{2}", "\\boxed{\\cos 30^\\circ}", False),
    ("infinity", "\\infty", "\\boxed{\\infty}", True),
    ("infinity", "-\\infty", "\\boxed{\\infty}", False),
    ("negative", "-5", "\\boxed{-5}", True),
    ("negative", "-5", "\\boxed{5}", False),
    ("mixed-number", "7\\frac{1}{2}", "\\boxed{7.5}", True),
    ("mixed-number", "\\frac{15}{2}", "\\boxed{7\\frac{1}{2}}", True),
    ("mixed-number", "7\\frac{1}{2}", "\\boxed{3.5}", False),
    ("complex", "3+4i", "\\boxed{4i+3}", True),
    ("complex", "3+4i", "\\boxed{3-4i}", False),
    ("complex", "-1", "\\boxed{i^2}", True),
    ("interval", "[2,5)", "\\boxed{[2, 5)}", True),
    ("interval", "[2,5)", "\\boxed{[2, 5]}", False),
    ("interval", "(-\\infty,-1)\\cup(1,\\infty)", "\\boxed{(1,\\infty)\\cup(-\\infty,-1)}", True),
    ("interval", "x < 3", "\\boxed{(-\\infty, 3)}", True),
    ("set", "\\{1,2\\}", "\\boxed{\\{2,1\\}}", True),
    ("set", "\\{1,2\\}", "\\boxed{\\{1,3\\}}", False),
    ("solution-list", "2, -3", "\\boxed{-3, 2}", True),
    ("solution-list", "2, -3", "\\boxed{2}", False),
    ("solution-list", "1 \\pm \\sqrt{2}", "\\boxed{1-\\sqrt{2}, 1+\\sqrt{2}}", True),
    ("tuple", "(1,2)", "\\boxed{(1, 2)}", True),
    ("tuple", "(1,2)", "\\boxed{(2,1)}", False),
    ("matrix", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\boxed{\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}}", True),
    ("matrix", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\boxed{\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}}", False),
    ("equation", "x = 3", "\\boxed{3}", True),
    ("equation", "3", "\\boxed{x = 3}", True),
    ("equation", "x = 3", "\\boxed{x = -3}", False),
    ("equation", "2x+4y-3=0", "\\boxed{y=-\\frac{1}{2}x+\\frac{3}{4}}", True),
    ("equation", "5x - 7y + 11z + 4 = 0", "\\boxed{x + y - z + 2 = 0}", False),
    ("inequality", "x \\geq 5", "\\boxed{5 \\le x}", True),
    ("inequality", "x \\geq 5", "\\boxed{x \\le 5}", False),
    ("choice", "(A)", "The answer is \\boxed{A}", True),
    ("choice", "(A)", "The answer is \\boxed{B}", False),
    ("text", "\\text{Evelyn}", "So \\boxed{\\text{Evelyn}} is fastest.", True),
    ("text", "\\text{Evelyn}", "So \\boxed{\\text{Carla}} is fastest.", False),
    ("units", "15", "\\boxed{15\\mbox{ cm}^2}", True),
    ("units", "125", "\\boxed{125\\textnormal{ miles}}", True),
    ("units", "15", "\\boxed{16\\text{ cm}}", False),
    ("latex-style", "\\frac{1}{2}", "\\boxed{\\displaystyle\\left(\\dfrac{1}{2}\\right)}", True),
    ("latex-style", "\\frac{1}{2}", "\\boxed{\\left(\\tfrac{1}{3}\\right)}", False),
    ("time", "20:34", "\\boxed{20:34}", True),
    ("time", "20:34", "\\boxed{8:34\\text{ pm}}", True),
    ("time", "12:00", "\\boxed{1:00}", False),
    ("symbolic", "\\tan^2(y)+1", "\\boxed{\\sec^2(y)}", True),
    ("symbolic", "x^2-1", "\\boxed{(x-1)(x+1)}", True),
    ("symbolic", "x+2n+1", "\\boxed{x+1}", False),
    ("choice-prose", "D", "The answer is for sure D, it can't be A or B", True),
    ("choice-prose", "B", "Let's think step by step. It's not A because it doesn't make sense, therefore I think it's B", True),
    ("choice-prose", "D", "D. it can't be A or B", True),
    ("choice-prose", "B", "B。不是 A", True),
    ("choice-prose", "C", "réponse est C non A", True),
    ("choice-prose", "C Cecile", "C", True),
    ("choice-prose", "Alina and the answer is\n(C) Cecile", "C", True),
    ("choice-prose", "(A) Cecile", "C", False),
    ("choice-prose", "E", "\\mathrm{E}*2", False),
    ("choice-prose", "C", "C. x = 42", True),
    ("multilingual", "99", "**结论**：Haley总共有99颗弹珠。", True),
    ("multilingual", "4000", " 地块面积 = 72000 / 18 = 4000千克", True),
    ("multilingual", "2/5", "答案：每份应该是 (\\frac{2}{5}) 吨。", True),
    ("multilingual", "220", "Réponse: Janeth aura encore 220 $ à payer d'ici 12 mois.", True),
    ("multilingual", "12", "Réponse: Janeth aura encore 220 $ à payer d'ici 12 mois.", False),
    ("escapes", "\\frac{\\sqrt{17}}{17}", "$\x0crac{\\sqrt{17}}{17}$", True),
    ("escapes", "185", "185\\", True),
    ("escapes", "\\text{13}", "$\text{13}$", False),
    ("equation-groups", "\\boxed{ p = 5, q = 2 \\quad \\text{and} \\quad p = 7, q = 2}", "$p=5,q=2;p=7,q=2$", True),
    ("equation-groups", "\\boxed{ p = 5, q = 2 \\quad \\text{and} \\quad p = 7, q = 2}", "$p=5,q=2;p=7,q=3$", False),
    ("matrix-bare", "\\begin{pmatrix}0&0\\\\0&1\\end{pmatrix}", "\\begin{bmatrix} 0 & 0 \\\\ 0 & 1 \\end{bmatrix}", True),
    ("matrix-bare", "\\begin{pmatrix}0&0\\\\0&1\\end{pmatrix}", "\\begin{bmatrix} 0 & 1 \\\\ 0 & 0 \\end{bmatrix}", False),
    # adversarial review by category: realistic model outputs (true and false); see docs/verifier.md
    ("thousands", "2000", "So she has \\$2{,}000 left.", True),
    ("thousands", "1,2", "The final answer is $\\boxed{12}$.", False),
    ("thousands", "1000", "The final answer is $\\boxed{1,000}$.", True),
    ("thousands", "1,000", "The final answer is $\\boxed{1000}$.", True),
    ("thousands", "1, 000", "The final answer is $\\boxed{1000}$.", False),
    ("thousands", "1,2", "The final answer is $\\boxed{1, 2}$.", True),
    ("thousands", "12345", "The final answer is $\\boxed{12,345}$.", True),
    ("thousands", "100", "The final answer is $\\boxed{1,000}$.", False),
    ("thousands", "1234567", "The final answer is $\\boxed{1,234,567.0}$.", True),
    ("thousands", "3,5", "The final answer is $\\boxed{5, 3}$.", True),
    ("decimal-fraction", "\\frac{2}{3}", "The final answer is $\\boxed{0.66}$.", False),
    ("decimal-fraction", "\\frac{3}{4}", "The final answer is $\\boxed{0.75}$.", True),
    ("decimal-fraction", "0.75", "The final answer is $\\boxed{\\dfrac34}$.", True),
    ("decimal-fraction", "\\frac{2}{3}", "The final answer is $\\boxed{0.67}$.", True),
    ("decimal-fraction", "0.375", "The final answer is $\\boxed{3/7}$.", False),
    ("decimal-fraction", "\\frac{1}{3}", "The final answer is $\\boxed{0.\\overline{3}}$.", True),
    ("decimal-fraction", "3/8", "The final answer is $\\boxed{0.375}$.", True),
    ("decimal-fraction", "\\frac{1}{2}", "The probability is $\\frac{1}{3}$.", False),
    ("decimal-fraction", "-\\frac{5}{2}", "The final answer is $\\boxed{-2.5}$.", True),
    ("decimal-fraction", "\\frac{7}{2}", "The final answer is $\\boxed{\\frac{14}{4}}$.", True),
    ("radical", "2\\sqrt{5}", "The final answer is $\\boxed{\\sqrt{10}}$.", False),
    ("radical", "\\frac{\\sqrt{2}}{2}", "The final answer is $\\boxed{\\frac{1}{\\sqrt{2}}}$.", True),
    ("radical", "3\\sqrt{3}", "The final answer is $\\boxed{\\sqrt{27}}$.", True),
    ("radical", "\\sqrt[3]{2}", "The final answer is $\\boxed{2^{1/3}}$.", True),
    ("radical", "\\sqrt{3}/3", "The final answer is $\\boxed{\\sqrt{3}}$.", False),
    ("radical", "2\\sqrt{5}", "The final answer is $\\boxed{4.472}$.", True),
    ("radical", "\\sqrt{2}+\\sqrt{3}", "The final answer is $\\boxed{\\sqrt{5+2\\sqrt{6}}}$.", True),
    ("radical", "5\\sqrt2", "The final answer is $\\boxed{5 \\sqrt 2}$.", True),
    ("pi", "\\frac{\\pi}{4}", "The final answer is $\\boxed{\\frac{\\pi}{3}}$.", False),
    ("pi", "\\pi", "The final answer is $\\boxed{3.14159}$.", True),
    ("pi", "4\\pi", "The final answer is $\\boxed{4 \\pi}$.", True),
    ("pi", "\\frac{\\pi}{4}", "The final answer is $\\boxed{\\pi/4}$.", True),
    ("pi", "2\\pi", "The final answer is $\\boxed{2}$.", False),
    ("pi", "18\\pi", "The final answer is $\\boxed{18\\pi \\text{ cm}^2}$.", True),
    ("pi", "100\\pi", "The final answer is $\\boxed{314.16}$.", True),
    ("pi", "\\pi", "The final answer is $\\boxed{3.15}$.", False),
    ("pi", "\\pi r^2", "The final answer is $\\boxed{r^2\\pi}$.", True),
    ("pi", "\\pi", "The final answer is $\\boxed{3.14}$.", True),
    ("e", "e^2", "The final answer is $\\boxed{2e}$.", False),
    ("e", "e", "The final answer is $\\boxed{e}$.", True),
    ("e", "e^{-1}", "The final answer is $\\boxed{\\frac{1}{e}}$.", True),
    ("e", "\\frac{1}{e}", "The final answer is $\\boxed{0.3679}$.", True),
    ("e", "e^x", "The final answer is $\\boxed{\\exp(2x)}$.", False),
    ("e", "e^2", "The final answer is $\\boxed{7.389}$.", True),
    ("e", "\\ln 2", "The final answer is $\\boxed{0.693}$.", True),
    ("e", "1-\\frac{1}{e}", "The final answer is $\\boxed{\\frac{e-1}{e}}$.", True),
    ("e", "-1", "The final answer is $\\boxed{e^{i\\pi}}$.", True),
    ("e", "e", "The final answer is $\\boxed{\\exp(1)}$.", True),
    ("scientific", "2.5\\times10^{-3}", "The final answer is $\\boxed{0.025}$.", False),
    ("scientific", "1.5\\times10^3", "The final answer is $\\boxed{1500}$.", True),
    ("scientific", "1500", "The final answer is $\\boxed{1.5e3}$.", True),
    ("scientific", "1500", "The final answer is $\\boxed{1.5 \\times 10^{3}}$.", True),
    ("scientific", "1500", "The final answer is $\\boxed{1.5e4}$.", False),
    ("scientific", "6.02\\times 10^{23}", "The final answer is $\\boxed{6.02 \\cdot 10^{23}}$.", True),
    ("scientific", "2.5\\times10^{-3}", "The final answer is $\\boxed{0.0025}$.", True),
    ("scientific", "2\\times10^{-5}", "The final answer is $\\boxed{2e-6}$.", False),
    ("scientific", "10^{6}", "The final answer is $\\boxed{1000000}$.", True),
    ("scientific", "1.2E-4", "The final answer is $\\boxed{0.00012}$.", True),
    ("percent", "50\\%", "The final answer is $\\boxed{5}$.", False),
    ("percent", "50\\%", "The final answer is $\\boxed{50}$.", True),
    ("percent", "50\\%", "The final answer is $\\boxed{0.5}$.", True),
    ("percent", "50", "The final answer is $\\boxed{50\\%}$.", True),
    ("percent", "40\\%", "The final answer is $\\boxed{60\\%}$.", False),
    ("percent", "0.5", "The final answer is $\\boxed{50\\%}$.", True),
    ("percent", "12.5\\%", "The final answer is $\\boxed{\\frac{1}{8}}$.", True),
    ("percent", "0.5", "The final answer is $\\boxed{50}$.", False),
    ("percent", "25", "So the percentage is 25%.", True),
    ("percent", "25\\%", "The final answer is $\\boxed{25 \\text{ percent}}$.", True),
    ("degrees", "\\frac{1}{2}", "The final answer is $\\boxed{\\sin 30}$.", False),
    ("degrees", "30^\\circ", "The final answer is $\\boxed{30}$.", True),
    ("degrees", "30", "The final answer is $\\boxed{30^\\circ}$.", True),
    ("degrees", "30", "The final answer is $\\boxed{30^{\\circ}}$.", True),
    ("degrees", "60^\\circ", "The final answer is $\\boxed{30^\\circ}$.", False),
    ("degrees", "30^\\circ", "The final answer is $\\boxed{30°}$.", True),
    ("degrees", "30^\\circ", "The final answer is $\\boxed{\\frac{\\pi}{6}}$.", True),
    ("degrees", "60^\\circ", "The final answer is $\\boxed{\\frac{\\pi}{6}}$.", False),
    ("degrees", "\\frac{1}{2}", "The final answer is $\\boxed{\\sin 30^\\circ}$.", True),
    ("degrees", "\\frac{\\sqrt{3}}{2}", "The final answer is $\\boxed{\\cos 30^{\\circ}}$.", True),
    ("infinity", "\\infty", "The final answer is $\\boxed{\\text{infinity}}$.", True),
    ("infinity", "(0,\\infty)", "The final answer is $\\boxed{[0, \\infty)}$.", False),
    ("infinity", "\\infty", "The final answer is $\\boxed{+\\infty}$.", True),
    ("infinity", "\\infty", "The final answer is $\\boxed{\\infty}$.", True),
    ("infinity", "\\infty", "The final answer is $\\boxed{-\\infty}$.", False),
    ("infinity", "(-\\infty, \\infty)", "The final answer is $\\boxed{\\mathbb{R}}$.", True),
    ("infinity", "(0,\\infty)", "The final answer is $\\boxed{(0, +\\infty)}$.", True),
    ("infinity", "\\infty", "The final answer is $\\boxed{\\text{undefined}}$.", False),
    ("infinity", "\\infty", "The final answer is $\\boxed{\\infty \\text{ ways}}$.", True),
    ("negative", "-\\frac{1}{2}", "The final answer is $\\boxed{\\frac{1}{2}}$.", False),
    ("negative", "-3", "The final answer is $\\boxed{-3}$.", True),
    ("negative", "-3", "The final answer is $\\boxed{−3}$.", True),
    ("negative", "-\\frac{1}{2}", "The final answer is $\\boxed{\\frac{-1}{2}}$.", True),
    ("negative", "-3", "The answer is 3.", False),
    ("negative", "-\\frac{1}{2}", "The final answer is $\\boxed{-0.5}$.", True),
    ("negative", "-3", "The final answer is $\\boxed{(-3)}$.", True),
    ("negative", "-0.75", "The final answer is $\\boxed{0.75}$.", False),
    ("negative", "-3", "The answer is -3.", True),
    ("negative", "-2", "The final answer is $\\boxed{- 2}$.", True),
    ("mixed-number", "2\\frac{1}{2}", "She needs 2 1/2 cups.", True),
    ("mixed-number", "2\\frac{1}{2}", "The final answer is $\\boxed{1}$.", False),
    ("mixed-number", "2\\frac{1}{2}", "The final answer is $\\boxed{\\frac{5}{2}}$.", True),
    ("mixed-number", "\\frac{5}{2}", "The final answer is $\\boxed{2\\frac{1}{2}}$.", True),
    ("mixed-number", "2\\frac{1}{2}", "The final answer is $\\boxed{2\\cdot\\frac{1}{2}}$.", False),
    ("mixed-number", "5/2", "The final answer is $\\boxed{2 1/2}$.", True),
    ("mixed-number", "2 1/2", "The final answer is $\\boxed{2.5}$.", True),
    ("mixed-number", "3\\frac{3}{4}", "The final answer is $\\boxed{\\frac{9}{4}}$.", False),
    ("mixed-number", "-2\\frac{1}{2}", "The final answer is $\\boxed{-2.5}$.", True),
    ("mixed-number", "3\\frac{3}{4}", "The final answer is $\\boxed{3\\tfrac{3}{4}}$.", True),
    ("complex", "2+3i", "The final answer is $\\boxed{2+3\\mathrm{i}}$.", True),
    ("complex", "1-i", "The final answer is $\\boxed{1+i}$.", False),
    ("complex", "2i", "The final answer is $\\boxed{2i}$.", True),
    ("complex", "1+i", "The final answer is $\\boxed{i+1}$.", True),
    ("complex", "-1", "The final answer is $\\boxed{i}$.", False),
    ("complex", "\\frac{1}{2}+\\frac{\\sqrt{3}}{2}i", "The final answer is $\\boxed{\\frac{1+i\\sqrt{3}}{2}}$.", True),
    ("complex", "5", "The final answer is $\\boxed{(2+i)(2-i)}$.", True),
    ("complex", "1\\pm i", "The final answer is $\\boxed{1+i}$.", False),
    ("complex", "i", "The final answer is $\\boxed{\\sqrt{-1}}$.", True),
    ("complex", "3", "Let i be the number of iterations. Then i = 3, so the answer is 3.", True),
    ("interval", "(-\\infty,1)\\cup(1,\\infty)", "The final answer is $\\boxed{x \\neq 1}$.", True),
    ("interval", "(1,3]", "The final answer is $\\boxed{[1,3]}$.", False),
    ("interval", "(1,3]", "The final answer is $\\boxed{(1,3]}$.", True),
    ("interval", "[0,1]", "The final answer is $\\boxed{0 \\le x \\le 1}$.", True),
    ("interval", "(-\\infty, 2]", "The final answer is $\\boxed{x < 2}$.", False),
    ("interval", "(-\\infty, 2]", "The final answer is $\\boxed{x \\leq 2}$.", True),
    ("interval", "[1,\\infty)", "The final answer is $\\boxed{\\left[1, \\infty\\right)}$.", True),
    ("interval", "(-2,2)", "The final answer is $\\boxed{(-2, 2] }$.", False),
    ("interval", "(-2, 2)", "The final answer is $\\boxed{-2<x<2}$.", True),
    ("interval", "(1,3]", "The final answer is $\\boxed{x \\in (1, 3]}$.", True),
    ("set", "\\{1,2,3\\}", "The final answer is $\\boxed{\\{1,2\\}}$.", False),
    ("set", "\\{1,2,3\\}", "The final answer is $\\boxed{\\{3,2,1\\}}$.", True),
    ("set", "1,2,3", "The final answer is $\\boxed{3,2,1}$.", True),
    ("set", "x=1, x=2", "The final answer is $\\boxed{1,2}$.", True),
    ("set", "2,3", "The final answer is $\\boxed{2,3,4}$.", False),
    ("set", "\\{-1, 1\\}", "The final answer is $\\boxed{\\pm 1}$.", True),
    ("set", "2, 3", "The final answer is $\\boxed{x = 2 \\text{ or } x = 3}$.", True),
    ("set", "\\emptyset", "The final answer is $\\boxed{\\{0\\}}$.", False),
    ("set", "\\emptyset", "The final answer is $\\boxed{\\varnothing}$.", True),
    ("set", "\\{1, 2\\}", "The final answer is $\\boxed{x \\in \\{1, 2\\}}$.", True),
    ("tuple", "(1,2)", "The final answer is $\\boxed{\\langle 1, 2 \\rangle}$.", True),
    ("tuple", "(3,-1)", "The final answer is $\\boxed{(-1,3)}$.", False),
    ("tuple", "(3,-1)", "The final answer is $\\boxed{(3, -1)}$.", True),
    ("tuple", "(1,2,3)", "The final answer is $\\boxed{\\left(1,2,3\\right)}$.", True),
    ("tuple", "(1,2,3)", "The final answer is $\\boxed{(1,2)}$.", False),
    ("tuple", "(1,2)", "The final answer is $\\boxed{x=1, y=2}$.", True),
    ("tuple", "(1, 2)", "The final answer is $\\boxed{(x,y) = (1,2)}$.", True),
    ("tuple", "(2,3)", "The final answer is $\\boxed{a = 3, b = 2}$.", False),
    ("tuple", "(\\frac{1}{2}, 3)", "The final answer is $\\boxed{(0.5, 3)}$.", True),
    ("tuple", "\\left( 3, \\frac{\\pi}{2} \\right)", "The final answer is $\\boxed{(3,\\frac{\\pi}{2})}$.", True),
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "The final answer is $\\boxed{\\langle 1,2\\rangle}$.", True),
    ("matrix", "\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "The final answer is $\\boxed{\\begin{bmatrix} 1 & 0 \\\\ 0 & 2 \\end{bmatrix}}$.", False),
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "The final answer is $\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}$.", True),
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "The final answer is $\\boxed{(1,2)}$.", True),
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "The final answer is $\\boxed{\\begin{pmatrix}2\\\\1\\end{pmatrix}}$.", False),
    ("matrix", "\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 1 \\end{pmatrix}", "The final answer is $\\boxed{\\begin{pmatrix} 0.5 & 0 \\\\ 0 & 1 \\end{pmatrix}}$.", True),
    ("matrix", "\\begin{pmatrix} -1 \\\\ 2 \\\\ 0 \\end{pmatrix}", "The final answer is $\\boxed{\\begin{pmatrix} -1 \\\\ 2 \\\\ 0 \\end{pmatrix}}$.", True),
    ("matrix", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "The final answer is $\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}$.", False),
    ("matrix", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "The final answer is $\\boxed{\\left[\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right]}$.", True),
    ("matrix", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", "The final answer is $\\boxed{\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}}$.", True),
    ("equation", "y=2x+1", "The final answer is $\\boxed{y=2x-1}$.", False),
    ("equation", "x=3", "The final answer is $\\boxed{3}$.", True),
    ("equation", "3", "The final answer is $\\boxed{x=3}$.", True),
    ("equation", "y=2x+1", "The final answer is $\\boxed{2x+1}$.", True),
    ("equation", "x^2+y^2=25", "The final answer is $\\boxed{x^2+y^2=5}$.", False),
    ("equation", "2x+1", "The final answer is $\\boxed{y=2x+1}$.", True),
    ("equation", "y = 2x + 1", "The final answer is $\\boxed{y - 2x = 1}$.", True),
    ("equation", "x=3", "The final answer is $\\boxed{y=3}$.", False),
    ("equation", "x^2+y^2=25", "The final answer is $\\boxed{y^2+x^2=25}$.", True),
    ("equation", "f(x)=x^2", "The final answer is $\\boxed{x^2}$.", True),
    ("choice", "B", "Answer: (C)", False),
    ("choice", "A", "The final answer is $\\boxed{(A)}$.", True),
    ("choice", "(A)", "The final answer is $\\boxed{A}$.", True),
    ("choice", "A", "The final answer is $\\boxed{\\text{(A)}}$.", True),
    ("choice", "B", "The final answer is $\\boxed{A}$.", False),
    ("choice", "B", "Answer: B", True),
    ("choice", "C", "The final answer is $\\boxed{\\textbf{(C)}}$.", True),
    ("choice", "B", "**Answer:** (D)", False),
    ("choice", "C", "The final answer is $\\boxed{\\textbf{(C) }12}$.", True),
    ("choice", "D", "The final answer is $\\boxed{\\text{D}}$.", True),
    ("text", "\\text{Tuesday}", "The answer is Tuesday.", True),
    ("text", "\\text{no}", "The final answer is $\\boxed{\\text{yes}}$.", False),
    ("text", "\\text{yes}", "The final answer is $\\boxed{\\text{Yes}}$.", True),
    ("text", "Yes", "The final answer is $\\boxed{\\text{yes}}$.", True),
    ("text", "\\text{odd}", "The final answer is $\\boxed{\\text{even}}$.", False),
    ("text", "\\text{Tuesday}", "The final answer is $\\boxed{\\textbf{Tuesday}}$.", True),
    ("text", "\\text{(C)}", "The final answer is $\\boxed{C}$.", True),
    ("text", "\\text{Monday}", "The answer is Tuesday.", False),
    ("text", "\\text{Devon}", "The final answer is $\\boxed{Devon}$.", True),
    ("text", "Devon", "The final answer is $\\boxed{\\text{ Devon }}$.", True),
    ("units", "5", "The final answer is $\\boxed{5\\%\\text{ per year}}$.", True),
    ("units", "5", "The final answer is $\\boxed{6 \\text{ cm}}$.", False),
    ("units", "5", "The final answer is $\\boxed{5 \\text{ cm}}$.", True),
    ("units", "5", "The final answer is $\\boxed{5 cm}$.", True),
    ("units", "5", "The final answer is $\\boxed{\\$6.00}$.", False),
    ("units", "5", "The final answer is $\\boxed{5 meters}$.", True),
    ("units", "5", "The final answer is $\\boxed{\\$5}$.", True),
    ("units", "5", "The final answer is $\\boxed{50 \\text{ mm}}$.", False),
    ("units", "5", "The final answer is $\\boxed{5 \\text{ dollars}}$.", True),
    ("units", "5", "So she pays 5 dollars.", True),
    ("latex-style", "\\frac{1}{2}", "The final answer is $\\boxed{\\Large \\frac{1}{2}}$.", True),
    ("latex-style", "\\frac{1}{2}", "The final answer is $\\boxed{\\left.\\frac{1}{2}\\right.}$.", True),
    ("latex-style", "10", "The final answer is $\\boxed{\\boldsymbol{10}}$.", True),
    ("latex-style", "5", "The final answer is $\\boxed{\\color{red}{5}}$.", True),
    ("latex-style", "\\frac{3}{4}", "The final answer is $\\boxed{\\displaystyle \\dfrac{4}{3}}$.", False),
    ("latex-style", "\\frac{1}{2}", "The final answer is $\\boxed{\\!\\frac{1}{2}}$.", True),
    ("latex-style", "\\frac{1}{2}", "The final answer is $\\boxed{\\,\\tfrac{1}{2}\\,}$.", True),
    ("latex-style", "(1,2)", "The final answer is $\\boxed{\\left(1,\\,2\\right)}$.", True),
    ("latex-style", "\\frac{3}{4}", "The final answer is $\\boxed{\\displaystyle \\dfrac{3}{4}}$.", True),
    ("latex-style", "10", "The final answer is $\\boxed{\\mathbf{10}}$.", True),
    ("time", "20:34", "The final answer is $\\boxed{\\frac{10}{17}}$.", False),
    ("time", "10:30", "The meeting ends at 10:30 AM.", True),
    ("time", "12:30", "The movie ends at 12:30 p.m.", True),
    ("time", "20:34", "The final answer is $\\boxed{20:34}$.", True),
    ("time", "3:45", "The final answer is $\\boxed{3:54}$.", False),
    ("time", "20:34", "The final answer is $\\boxed{8:34 PM}$.", True),
    ("time", "3:45", "The final answer is $\\boxed{3:45}$.", True),
    ("time", "16:00", "The final answer is $\\boxed{4:00 \\text{ AM}}$.", False),
    ("time", "2:1", "The final answer is $\\boxed{2:1}$.", True),
    ("time", "9:00", "The final answer is $\\boxed{9:00 \\text{ a.m.}}$.", True),
    ("symbolic", "(x-2)(x+3)", "The final answer is $\\boxed{x^2-x-6}$.", False),
    ("symbolic", "x^2+2x+1", "The final answer is $\\boxed{(x+1)^2}$.", True),
    ("symbolic", "(x+1)^2", "The final answer is $\\boxed{x^2+2x+1}$.", True),
    ("symbolic", "(x-2)(x+3)", "The final answer is $\\boxed{x^2+x-6}$.", True),
    ("symbolic", "2\\cos^2 x - 1", "The final answer is $\\boxed{\\cos^2 x}$.", False),
    ("symbolic", "\\sin^2 x + \\cos^2 x", "The final answer is $\\boxed{1}$.", True),
    ("symbolic", "\\sin 2x", "The final answer is $\\boxed{2\\sin x\\cos x}$.", True),
    ("symbolic", "\\frac{x+1}{x-1}", "The final answer is $\\boxed{\\frac{x-1}{x+1}}$.", False),
    ("symbolic", "\\frac{x^2-1}{x-1}", "The final answer is $\\boxed{x+1}$.", True),
    ("symbolic", "2\\cos^2 x - 1", "The final answer is $\\boxed{\\cos 2x}$.", True),
    ("phrase", "42", "The answer is: 24", False),
    ("phrase", "42", "Thus, the final answer is 42.", True),
    ("phrase", "42", "**Final Answer**\n42", True),
    ("phrase", "42", "Final Answer: The final answer is 42. I hope it is correct.", True),
    ("phrase", "42", "I computed 42 but the final answer is 41.", False),
    ("phrase", "42", "Answer: $42$", True),
    ("phrase", "7", "The answer is $\\boxed{7}$.\n\nNote: step 3 used 12.", True),
    ("phrase", "12", "So the final answer is: \\[ \\boxed{13} \\]", False),
    ("phrase", "18", "Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18.\n#### 18", True),
    ("phrase", "3/4", "Therefore, the answer is $\\frac{3}{4}$.", True),
    ("last-number", "18", "She makes 9 * 2 = 18 dollars every day for 7 days.", False),
    ("last-number", "18", "She makes 9 * 2 = 18 dollars every day at the market.", True),
    ("last-number", "3.5", "so the result is 3.5.", True),
    ("last-number", "1000", "so the total is 1,000.", True),
    ("last-number", "4", "so x equals -4.", False),
    ("last-number", "-4", "so x equals -4.", True),
    ("last-number", "9", "There are 12 apples. After eating 3, 9 remain.", True),
    ("last-number", "12", "There are 12 apples. After eating 3, 9 remain.", False),
    ("last-number", "7", "The bag weighs 3.5 kg, so she needs 7 bags.", True),
    ("last-number", "2", "so x = 2.", True),
    ("time-ratio", "1/2", "The final answer is $\\boxed{1:2}$.", True),
    ("phrase-gsm8k", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72", "The final answer is $\\boxed{24}$.", False),
    ("phrase-gsm8k", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72", "The final answer is $\\boxed{72}$.", True),
    ("phrase-gsm8k", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72", "Therefore, she sold **72** clips.", True),
    ('units', '20', 'The final answer is $\\boxed{\\text{20 meters}}$.', True),
    ('equation', 'y=2x+1', 'The final answer is $\\boxed{x=2y+1}$.', False),
    ('equation', '(3,4)', 'The final answer is $\\boxed{x=3, y=4}$.', True),
    ('complex', '2i', 'The final answer is $\\boxed{2j}$.', False),
    ('complex', '-i', 'The final answer is $\\boxed{\\frac{1}{i}}$.', True),
    ('percent', '33\\frac{1}{3}\\%', 'The final answer is $\\boxed{\\frac{1}{3}}$.', True),
    ('degrees', '\\frac{\\sqrt{3}}{2}', 'The final answer is $\\boxed{\\sin(60^\\circ)}$.', True),
    ('choice', 'D', 'Looking at the options, (A) and (B) fail, so the answer is (D).', True),
    ('choice', 'D', '$\\boxed{\\textbf{(E) } 24}$', False),
    ('latex-style', '\\frac{1}{2}', 'The final answer is $\\boxed{\\dfrac{1}{2}\\,\\text{cm}}$.', True),
    ('mixed-number', '5\\frac{1}{4}', 'The final answer is $\\boxed{5.25}$.', True),
    ('time', '9:15', 'The final answer is $\\boxed{9:45}$.', False),
    ('last-number', '30', 'So the total time is 30 minutes.', True),
    ('last-number', '30', 'So the total time is 30 minutes, i.e. half an hour of 2 sessions.', False),
]


@pytest.mark.parametrize("category,gold,response,expected", CATEGORY_PAIRS, ids=[c[0] for c in CATEGORY_PAIRS])
def test_categories(category: str, gold: str, response: str, expected: bool) -> None:
    assert verify(response, gold, timeout=LIMIT) is expected


def test_every_category_has_true_and_false_pairs() -> None:
    labels: dict[str, set[bool]] = {}
    for category, _, _, expected in CATEGORY_PAIRS:
        labels.setdefault(category.split("-")[0], set()).add(expected)
    assert all(seen == {True, False} for seen in labels.values()), labels


@pytest.mark.parametrize(
    "response,answer",
    [
        ("We get $x=2$, so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("two boxes \\boxed{1} and \\boxed{2}", "1, 2"),
        ("\\fbox{7}", "7"),
        ("Final Answer: The final answer is $28\\%$. I hope it is correct.", "28\\%"),
        ("Step 1 gives 3. Step 2 gives 5.\nAnswer: 12", "12"),
        ("so the total is 41 apples", "41"),
        ("#### 18", "18"),
        ("nothing to see here", None),
        ("Answer $ \n 9 \n $", None),  # inline math may not span lines
        ("how many $? just about 1$", "1"),
        ("\\boxed{35} ++++++ \\boxed{4}", "35, 4"),
        ("", None),
    ],
)
def test_extract_answer(response: str, answer: str | None) -> None:
    assert extract_answer(response) == answer


def test_last_number_fallback_is_configurable() -> None:
    assert verify("so the total is 41 apples", "41")
    assert not verify("so the total is 41 apples", "41", last_number=False)
    assert extract_answer("so the total is 41 apples", last_number=False) is None


PATHOLOGICAL = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    "\\boxed{(10^{100})!}",
    "\\boxed{" + "1+" * 5000 + "1}",
    "x" * 10_000,
    "\\boxed{" + "(" * 3000 + "}",
    "\\boxed{\\frac{1}{2",
    "}}}{{{\\frac{\\sqrt{",
    "\\boxed{\\sum_{n=1}^{10^{12}} n^{n}}",
    "\\(" * 13000,  # unclosed openers: extraction (in the calling process) must stay linear
    "\\[" * 13000,
]


@pytest.mark.slow
@pytest.mark.parametrize("response", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_inputs_return_false_within_limit(response: str) -> None:
    start = time.perf_counter()
    assert verify(response, "1", timeout=LIMIT) is False
    assert time.perf_counter() - start < LIMIT + SLACK


def test_pathological_gold_returns_false_within_limit() -> None:
    start = time.perf_counter()
    assert verify("\\boxed{1}", "9^{9^{9^{9}}}", timeout=LIMIT) is False
    assert time.perf_counter() - start < LIMIT + SLACK


def test_non_string_inputs_never_raise() -> None:
    assert verify(None, "1") is False  # type: ignore[arg-type]
    assert verify("\\boxed{1}", None) is False  # type: ignore[arg-type]
    assert verify(b"\\boxed{1}", "1") is False  # type: ignore[arg-type]
    assert verify("\\boxed{1}", 1) is True
    assert verify("\\boxed{0.5}", 0.5) is True


def test_threads_with_a_pathological_input() -> None:
    verify("\\boxed{x+1}", "1+x")  # start the worker pool outside the timed part
    pairs = [("\\boxed{9^{9^{9^{9}}}}", "1")] + [(f"\\boxed{{\\frac{{x}}{{{k}}}}}", f"x/{k}") for k in range(2, 9)]
    results: list[bool | None] = [None] * len(pairs)

    def run(k: int) -> None:
        results[k] = verify(*pairs[k], timeout=LIMIT)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(pairs))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.perf_counter() - start < LIMIT + 2 * SLACK
    assert results == [False] + [True] * (len(pairs) - 1)


def test_verify_batch_and_reward_shapes() -> None:
    pairs = [("\\boxed{2}", "2"), ("\\boxed{3}", "2"), ("\\boxed{\\sqrt{4}}", "2")]
    assert verify_batch(pairs, workers=2, progress=False) == [True, False, True]
    completions = [[{"role": "assistant", "content": "\\boxed{2}"}], "\\boxed{5}"]
    assert math_reward(completions, ["2", "2"]) == [1.0, 0.0]
    assert math_reward(["\\boxed{1/2}"], solution=["0.5"]) == [1.0]


def test_import_is_torch_free() -> None:
    code = "import sys, pacs, pacs.verify, pacs.cli; assert 'torch' not in sys.modules; assert 'sympy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_single_pair(capsys: pytest.CaptureFixture[str]) -> None:
    from pacs.cli import main

    assert main(["verify", "--gold", "1/2", "--response", "so \\boxed{0.5}"]) == 0
    assert capsys.readouterr().out.strip() == "True"
    assert main(["verify", "--gold", "1/2", "--response", "so \\boxed{0.4}"]) == 1
    assert capsys.readouterr().out.strip() == "False"


def test_cli_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pacs.cli import main

    path = tmp_path / "samples.jsonl"
    rows = [{"out": "\\boxed{2}", "ref": "2"}, {"out": "\\boxed{3}", "ref": "2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["verify", "--file", str(path), "--response-key", "out", "--gold-key", "ref", "--quiet"]) == 0
    assert "accuracy: 0.5000 (1/2 correct" in capsys.readouterr().out


def test_pairs_file_is_well_formed() -> None:
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 150
    for row in rows:
        assert {"gold", "response", "expected", "source"} <= row.keys()
        assert isinstance(row["expected"], bool) and row["source"]


@pytest.mark.slow
def test_agreement_at_least_math_verify_and_98_percent() -> None:
    sys.path.insert(0, str(ROOT))
    from studies.verifier_agreement import _math_verify_judge, _pacs_judge, load_pairs, score

    rows = load_pairs(PAIRS)
    ours = score(_pacs_judge(), rows)
    assert ours["exceptions"] == 0
    assert ours["agree"] / ours["n"] >= 0.98, ours["agree"]
    math_verify = _math_verify_judge()
    if math_verify is None:
        pytest.skip("math-verify is not installed: only the 98% bar was checked")
    theirs = score(math_verify, rows)
    assert ours["agree"] >= theirs["agree"]


# --------------------------------------------------------------------------------------------------------------
# Fuzz tests of pacs.verify: random strings never raise and never exceed the time limit.


LATEX_PIECES = [
    "\\boxed{", "\\frac{", "\\sqrt{", "}", "{", "^", "_", "(", ")", "[", "]", "\\{", "\\}", ",", "=", "<", "\\le",
    "\\pi", "\\infty", "i", "e", "x", "y", "0", "1", "2", "9", ".", "-", "+", "\\cdot", "\\times", "%", "^\\circ",
    "\\text{cm}", "\\left(", "\\right)", "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\\\", "$", "\\cup", "!",
    "\\sin", "\\pm", " ", "answer is ", "10^{", ":",
]
latexish = st.lists(st.sampled_from(LATEX_PIECES), max_size=30).map("".join)
anything = st.text(max_size=200)


@pytest.mark.slow
@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=st.one_of(anything, latexish), gold=st.one_of(anything, latexish))
def test_string_stages_never_raise(response: str, gold: str) -> None:
    """Extraction, normalization and the fast path run in-process on every call, so they must be total."""
    pred = extract_answer(response)
    ref = extract_gold(gold)
    if pred is not None and ref is not None:
        for g in parse_answer(ref):
            for p in parse_answer(pred):
                assert quick_equal(g, p) in (True, False, None)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=st.one_of(latexish, anything), gold=latexish)
def test_verify_never_raises_nor_overruns(response: str, gold: str) -> None:
    start = time.perf_counter()
    assert verify(response, gold, timeout=LIMIT) in (True, False)
    assert time.perf_counter() - start < LIMIT + SLACK


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(1, 999))
def test_fraction_and_decimal_agree(numerator: int, denominator: int) -> None:
    value = numerator / denominator
    gold = f"\\frac{{{numerator}}}{{{denominator}}}"
    assert verify(f"\\boxed{{{value!r}}}", gold) is True
    assert verify(f"\\boxed{{{numerator + denominator}/{denominator}}}", gold) is False
