// Block-scaled dot-product tile, written from docs/KERNELS.md ("align" and "gemm"):
//
//   align   per operand: e_ref = max(e_block) - guard (EXP_ZERO blocks never win unless all
//           are); w[i] = q[i] >>r (e_ref - e_block(i)), right shifts beyond 62 taken as 62
//   MAC     acc = 0; for k = 0..K-1: acc = sat_acc(acc + wa[k] * wb[k]), narrowed to acc_bits
//           after every add (SAT / SAT_SYM clip, WRAP keeps the low bits); each narrowing that
//           changes the value is one event
//   bias    acc = sat_acc(acc + (bias >>r (e_acc - e_bias))), e_acc = e_ref_a + e_ref_b; the
//           left shift (at most 62) is exact
//   zero    an operand at or below EXP_ZERO (all blocks zero) with a bias: e_acc = e_bias +
//           max(0, bitlen(|bias|) - (acc_bits - 1)); without a bias e_acc stays e_ref_a + e_ref_b
//
// K codes per operand in blocks of BS (the last block may be short), one exponent per block.
// Combinational. Every intermediate is exact in 128 bits: |w| < 2**15, |bias'| < 2**94.
module bbct_dot_tile #(
    parameter int K = 10,
    parameter int BS = 4,
    parameter int NB = 3,
    parameter int ACC_W = 48
) (
    input  logic signed [8*K-1:0]   a,
    input  logic signed [16*NB-1:0] ea,
    input  logic signed [8*K-1:0]   b,
    input  logic signed [16*NB-1:0] eb,
    input  logic        [3:0]       guard,
    input  logic        [2:0]       align_rnd,
    input  logic        [5:0]       acc_bits,
    input  logic        [1:0]       acc_sat,
    input  logic signed [31:0]      bias,
    input  logic signed [15:0]      e_bias,
    input  logic                    bias_en,
    input  logic        [2:0]       bias_rnd,
    output logic signed [ACC_W-1:0] acc,
    output logic signed [15:0]      e_acc,
    output logic        [7:0]       events
);
  localparam logic [2:0] TRN = 3'd0, TRN_ZERO = 3'd1, RND = 3'd2, RND_ZERO = 3'd3, RND_INF = 3'd4, RND_CONV = 3'd5;
  localparam logic [1:0] SAT = 2'd0, SAT_SYM = 2'd1, WRAP = 2'd2;
  localparam integer EXP_ZERO = -1024;

  // v >>r s (s > 0, rounded with mode), v << -s (s <= 0, exact)
  function automatic logic signed [127:0] shr_round(input logic signed [127:0] v, input integer s,
                                                    input logic [2:0] mode);
    logic signed [127:0] q, r, half;
    begin
      if (s <= 0) begin
        shr_round = v <<< (-s);
      end else begin
        q = v >>> s;
        r = v - (q <<< s);
        half = 128'sd1 <<< (s - 1);
        case (mode)
          TRN: ;
          TRN_ZERO: if (v < 0 && r != 0) q = q + 1;
          default:
            if (r > half) q = q + 1;
            else if (r == half) begin
              case (mode)
                RND: q = q + 1;
                RND_ZERO: if (v < 0) q = q + 1;
                RND_INF: if (v >= 0) q = q + 1;
                RND_CONV: q = q + q[0];
                default: ;
              endcase
            end
        endcase
        shr_round = q;
      end
    end
  endfunction

  // v narrowed to a signed n-bit accumulator with mode
  function automatic logic signed [127:0] narrow(input logic signed [127:0] v, input integer n,
                                                 input logic [1:0] mode);
    logic signed [127:0] hi, lo;
    begin
      hi = (128'sd1 <<< (n - 1)) - 1;
      lo = (mode == SAT_SYM) ? -hi : -(128'sd1 <<< (n - 1));
      if (v >= lo && v <= hi) narrow = v;
      else if (mode == WRAP) narrow = (v <<< (128 - n)) >>> (128 - n);
      else narrow = (v > hi) ? hi : lo;
    end
  endfunction

  logic signed [127:0] wa[K], wb[K];
  logic signed [127:0] s_acc, t, nv, bias_al;
  integer i, ma, mb, era, erb, sh, ea_i, eb_i, e_out, nbits, n_ev, g, nacc;
  logic zero;

  always @* begin
    // integer copies of the unsigned ports: mixed with them, signed arithmetic would turn unsigned
    g = guard;
    nacc = acc_bits;
    ma = EXP_ZERO;
    mb = EXP_ZERO;
    for (i = 0; i < NB; i = i + 1) begin
      if ($signed(ea[16*i+:16]) > ma) ma = $signed(ea[16*i+:16]);
      if ($signed(eb[16*i+:16]) > mb) mb = $signed(eb[16*i+:16]);
    end
    era = ma - g;
    erb = mb - g;
    for (i = 0; i < K; i = i + 1) begin
      ea_i = $signed(ea[16*(i/BS)+:16]);
      eb_i = $signed(eb[16*(i/BS)+:16]);
      sh = era - ea_i;
      if (sh > 62) sh = 62;
      wa[i] = shr_round($signed(a[8*i+:8]), sh, align_rnd);
      sh = erb - eb_i;
      if (sh > 62) sh = 62;
      wb[i] = shr_round($signed(b[8*i+:8]), sh, align_rnd);
    end
    s_acc = 0;
    n_ev = 0;
    for (i = 0; i < K; i = i + 1) begin
      t = s_acc + wa[i] * wb[i];
      nv = narrow(t, nacc, acc_sat);
      if (nv != t) n_ev = n_ev + 1;
      s_acc = nv;
    end
    zero = (era <= EXP_ZERO) || (erb <= EXP_ZERO);
    e_out = era + erb;
    if (bias_en) begin
      if (zero) begin
        nbits = 0;
        for (i = 0; i < 32; i = i + 1)
          if (((bias < 0) ? -bias : bias) >>> i != 0) nbits = i + 1;
        e_out = e_bias;
        if (nbits > nacc - 1) e_out = e_out + nbits - (nacc - 1);
      end
      sh = e_out - e_bias;
      if (sh > 62) sh = 62;
      bias_al = shr_round(bias, sh, bias_rnd);
      t = s_acc + bias_al;
      nv = narrow(t, nacc, acc_sat);
      if (nv != t) n_ev = n_ev + 1;
      s_acc = nv;
    end
    acc = s_acc[ACC_W-1:0];
    e_acc = e_out[15:0];
    events = n_ev[7:0];
  end
endmodule
