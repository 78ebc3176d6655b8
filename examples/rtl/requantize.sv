// Static requantize unit, written from docs/KERNELS.md ("requantize", static case, and the
// rounding and saturation tables under "Number formats, rounding and saturation"):
//
//   y = sat(x >>r shift)      shift = exp_out - e_in
//
// A right shift beyond 62 is taken as 62. A left shift (shift < 0) is exact; a result that
// needs more than 62 bits overflows: SAT / SAT_SYM clip by its sign, WRAP keeps the low bits
// of the exact value. rnd and sat select the modes per input (Rounding / Saturation codes of
// kernels/formats.py). One result per clock, registered: latency 1.
module bbct_requantize #(
    parameter int OUT_BITS = 8
) (
    input  logic                       clk,
    input  logic signed [63:0]         x,      // |x| < 2**62
    input  logic signed [7:0]          shift,
    input  logic        [2:0]          rnd,
    input  logic        [1:0]          sat,
    output logic signed [OUT_BITS-1:0] y,
    output logic                       ovf     // narrowing changed the value
);
  localparam logic [2:0] TRN = 3'd0, TRN_ZERO = 3'd1, RND = 3'd2, RND_ZERO = 3'd3, RND_INF = 3'd4, RND_CONV = 3'd5;
  localparam logic [1:0] SAT = 2'd0, SAT_SYM = 2'd1, WRAP = 2'd2;
  localparam logic signed [127:0] HI = (128'sd1 <<< (OUT_BITS - 1)) - 1;
  localparam logic signed [127:0] MIN = -(128'sd1 <<< (OUT_BITS - 1));
  // beyond every bound, low OUT_BITS bits zero: what x << (more than 64) is for SAT and WRAP
  localparam logic signed [127:0] FAR = 128'sd1 <<< 100;

  logic signed [127:0] v, q, r, half, lo;
  logic signed [OUT_BITS-1:0] y_d;
  logic ovf_d;
  integer s;

  always @* begin
    s = shift;
    if (s > 62) s = 62;
    v = x;
    if (s <= 0) begin
      // |x| < 2**62: a left shift of up to 64 is exact in 128 bits
      if (s < -64 && x != 0) q = (x < 0) ? -FAR : FAR;
      else q = v <<< (-s);
    end else begin
      q = v >>> s;  // floor
      r = v - (q <<< s);  // dropped bits, 0 <= r < 2**s
      half = 128'sd1 <<< (s - 1);
      case (rnd)
        TRN: ;
        TRN_ZERO: if (v < 0 && r != 0) q = q + 1;
        default:
          if (r > half) q = q + 1;
          else if (r == half) begin  // exactly halfway: the mode decides
            case (rnd)
              RND: q = q + 1;
              RND_ZERO: if (v < 0) q = q + 1;
              RND_INF: if (v >= 0) q = q + 1;
              RND_CONV: q = q + q[0];  // tie rule: half to even
              default: ;
            endcase
          end
      endcase
    end
    lo = (sat == SAT_SYM) ? -HI : MIN;
    if (q > HI || q < lo) begin
      ovf_d = 1'b1;
      if (sat == WRAP) y_d = q[OUT_BITS-1:0];
      else y_d = (q > HI) ? HI[OUT_BITS-1:0] : lo[OUT_BITS-1:0];
    end else begin
      ovf_d = 1'b0;
      y_d = q[OUT_BITS-1:0];
    end
  end

  always @(posedge clk) begin
    y   <= y_d;
    ovf <= ovf_d;
  end
endmodule
